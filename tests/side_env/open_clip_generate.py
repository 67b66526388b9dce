"""Run OpenCLIP's `CoCa.generate` in the side environment (tests/side_env/setup.sh) and save its token ids.

Usage: open_clip_generate.py JOB OUT. JOB (torch.save'd) holds the preset name, the images and a list of cases, each an
OpenCLIP state dict, a seed and the keyword arguments of `generate`; OUT receives each case's ids. The model is
tests/reference.py's `open_clip_coca_model` of the preset's tiny config: the architecture the calling test built its
weights for."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for reference.py

import open_clip.coca_model  # noqa: E402
from reference import open_clip_coca_model, tiny_config  # noqa: E402

from clipworks import get_preset  # noqa: E402


def main(job_path: str, out_path: str) -> None:
    if not open_clip.coca_model._has_transformers:
        raise SystemExit("OpenCLIP cannot import its generation classes here: run tests/side_env/setup.sh")
    job = torch.load(job_path)
    ref = open_clip_coca_model(tiny_config(get_preset(job["preset"]))).eval()
    outputs = []
    for state_dict, seed, kwargs in job["cases"]:
        ref.load_state_dict(state_dict)
        torch.manual_seed(seed)
        outputs.append(ref.generate(job["images"], **kwargs))
    import transformers

    torch.save({"outputs": outputs, "transformers": transformers.__version__}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
