"""CoCa caption generation (`models.coca.generate`) against OpenCLIP's `CoCa.generate`, token for token, on the same
random weights: greedy, top-k and top-p sampling under the same seed here, beam search (and the others again) in a side
environment with transformers 4.56.2; and `clipworks caption`."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipworks import CLIP, get_preset
from clipworks.checkpoints.open_clip import convert_from_open_clip
from clipworks.models.coca import EOS_TOKEN_ID, generate
from reference import open_clip_coca_model, perturb_, tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
coca_model = pytest.importorskip("open_clip.coca_model")

# The names OpenCLIP 3.3.0's coca_model imports from transformers for `generate`, beside BeamSearchScorer
_PROCESSORS = ("LogitsProcessorList", "TopPLogitsWarper", "TopKLogitsWarper", "RepetitionPenaltyLogitsProcessor",
               "MinLengthLogitsProcessor", "MaxLengthCriteria", "StopStringCriteria", "EosTokenCriteria",
               "StoppingCriteriaList")  # fmt: skip


class _NoBeamSearchScorer:
    """Stands in for transformers' BeamSearchScorer, and refuses to be used."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("the stand-in BeamSearchScorer was used: this test cannot compare beam search")


@pytest.fixture
def open_clip_generate(monkeypatch):
    """OpenCLIP's `CoCa.generate` made runnable under this project's transformers, without changing what it computes.

    OpenCLIP 3.3.0 imports its logits processors and BeamSearchScorer in one `try` block; transformers >= 4.57 no
    longer exports BeamSearchScorer, so the whole block fails and `generate` refuses to run (`_has_transformers` is
    False) even for greedy decoding. Here the module gets what that block would have bound: the real processors and
    stopping criteria from the installed transformers, and for BeamSearchScorer a stand-in that raises if
    constructed. Read coca_model.py: BeamSearchScorer is only constructed in `_generate_beamsearch`, which `generate`
    calls only for generation_type="beam_search"; the "top_k" / "top_p" paths use only MinLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor, TopK/TopPLogitsWarper, MaxLengthCriteria and StoppingCriteriaList. So those
    paths run OpenCLIP's own code unchanged, and any use of the stand-in fails the test rather than passing it.
    """
    if coca_model._has_transformers:
        return  # a transformers that still exports BeamSearchScorer: nothing to stand in for
    for name in _PROCESSORS:
        monkeypatch.setattr(coca_model, name, getattr(transformers, name), raising=False)
    monkeypatch.setattr(coca_model, "BeamSearchScorer", _NoBeamSearchScorer, raising=False)
    generation_types = {"top_k": transformers.TopKLogitsWarper, "top_p": transformers.TopPLogitsWarper,
                        "beam_search": "beam_search"}  # fmt: skip
    monkeypatch.setattr(coca_model, "GENERATION_TYPES", generation_types)
    monkeypatch.setattr(coca_model, "_has_transformers", True)


@functools.cache
def _pair(seed: int = 0, eos_bias: bool = False):
    """OpenCLIP's tiny coca_ViT-B-32 with random weights, and ours with the same weights.

    OpenCLIP leaves `text_decoder.text_projection` as `torch.empty` (often all zeros, so every logit ties and any
    decoder "matches"): `perturb_` fills every parameter, that one included, from a seeded generator.

    With `eos_bias` the captions end early and at different lengths (exercising padding and the finished-caption
    mask): the projection is scaled up (peaked distributions, as a trained model's) and end of text takes the column
    of the token greedy decoding picks most, slightly larger, so that it wins where that token would.
    """
    cfg = tiny_config(get_preset("coca_ViT-B-32"))
    torch.manual_seed(seed)
    ref = open_clip_coca_model(cfg).eval()
    perturb_(ref, seed=seed)
    proj = ref.text_decoder.text_projection  # (D, V)
    assert proj.abs().amax(0).amin() > 0.05  # initialised: no all-zero column, no logit tied at zero
    ours = CLIP(cfg).eval()
    if eos_bias:
        with torch.no_grad():
            proj *= 15
            ours.load_state_dict(convert_from_open_clip(ref.state_dict(), cfg))
            frequent = generate(ours, _images(), generation_type="top_k")[:, 3:].flatten().mode().values
            proj[:, EOS_TOKEN_ID] = proj[:, frequent] * 1.05
    ours.load_state_dict(convert_from_open_clip(ref.state_dict(), cfg))
    return ref, ours


def _images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# (weights seed, settings); OpenCLIP's defaults (seq_len=30, min_seq_len=5, temperature 1) unless given
CASES = {
    "greedy": (0, dict(generation_type="top_k", top_k=1)),
    "top_k": (1, dict(generation_type="top_k", top_k=5, seq_len=20)),
    "top_k_warm": (2, dict(generation_type="top_k", top_k=40, temperature=0.7, repetition_penalty=1.3, seq_len=20)),
    "top_p": (0, dict(generation_type="top_p", top_p=0.9, seq_len=20)),
    "top_p_narrow": (1, dict(generation_type="top_p", top_p=0.3, temperature=1.5, min_seq_len=2, seq_len=12)),
    "fixed_length": (2, dict(generation_type="top_k", top_k=3, fixed_output_length=True, seq_len=16)),
}


@pytest.mark.parametrize("eos_bias", [False, True], ids=["long", "ending"])
@pytest.mark.parametrize("case", CASES)
def test_tokens_match_open_clip(open_clip_generate, case, eos_bias, record_property):
    seed, kwargs = CASES[case]
    ref, ours = _pair(seed, eos_bias)
    images = _images()
    torch.manual_seed(100 + seed)
    theirs = ref.generate(images, **kwargs)
    after_theirs = torch.rand(3)  # the global generator must have advanced the same way
    torch.manual_seed(100 + seed)
    got = ours.generate(images, **kwargs)
    assert torch.equal(torch.rand(3), after_theirs)
    record_property("tokens", theirs.numel())
    assert got.dtype == theirs.dtype and torch.equal(got, theirs), (got, theirs)
    if eos_bias and not kwargs.get("fixed_output_length"):
        ends = (theirs == EOS_TOKEN_ID).nonzero()[:, 1]
        assert ends.min() < kwargs.get("seq_len", 30) - 1, theirs  # some caption ended before the limit forced it
        if case != "top_p_narrow":  # (there all end at min_seq_len)
            assert (theirs == 0).any(), theirs  # and not all at once: padding after the end of some


# --- against OpenCLIP's generate under transformers 4.56.2 (beam search needs its BeamSearchScorer) ---

SIDE_ENV = Path(__file__).parent / "side_env"
SIDE_CASES = [  # (weights seed, eos_bias, settings): OpenCLIP's defaults are beam_search, 6 beams in 3 groups
    (0, False, dict(generation_type="beam_search")),
    (1, False, dict(generation_type="beam_search", num_beams=4, num_beam_groups=2, seq_len=12, repetition_penalty=1.2)),
    (1, True, dict(generation_type="beam_search")),
    (2, True, dict(generation_type="beam_search", num_beams=4, num_beam_groups=4, fixed_output_length=True)),
    (0, True, dict(generation_type="beam_search", num_beams=2, num_beam_groups=1, min_seq_len=2, seq_len=10)),
    # the sampling paths too, with no stand-in at all (the real 4.56.2 processors)
    (1, True, dict(generation_type="top_k", top_k=1)),
    (0, True, dict(generation_type="top_p", top_p=0.9, seq_len=20)),
]


@pytest.fixture(scope="module")
def side_env_outputs(tmp_path_factory):
    """OpenCLIP's outputs for SIDE_CASES, run by tests/side_env/open_clip_generate.py in the side environment."""
    site = SIDE_ENV / "site"
    if not (site / "transformers").is_dir():
        pytest.skip("no side environment with transformers 4.56.2 (OpenCLIP's beam search needs its "
                    "BeamSearchScorer, gone from this project's transformers): run tests/side_env/setup.sh")  # fmt: skip
    folder = tmp_path_factory.mktemp("side")
    cases = [(_pair(seed, bias)[0].state_dict(), 100 + seed, kwargs) for seed, bias, kwargs in SIDE_CASES]
    torch.save({"preset": "coca_ViT-B-32", "images": _images(), "cases": cases}, folder / "job.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(SIDE_ENV / "open_clip_generate.py"), str(folder / "job.pt"),
                          str(folder / "out.pt")], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = torch.load(folder / "out.pt")
    assert out["transformers"] == "4.56.2"
    return out["outputs"]


@pytest.mark.parametrize("index", range(len(SIDE_CASES)))
def test_tokens_match_open_clip_in_the_side_env(side_env_outputs, index, record_property):
    seed, bias, kwargs = SIDE_CASES[index]
    _, ours = _pair(seed, bias)
    torch.manual_seed(100 + seed)
    got = ours.generate(_images(), **kwargs)
    theirs = side_env_outputs[index]
    record_property("tokens", theirs.numel())
    assert got.dtype == theirs.dtype and torch.equal(got, theirs), (got, theirs)


def test_beam_search_captions_end_and_pad():
    _, ours = _pair(1, eos_bias=True)
    ids = ours.generate(_images())  # OpenCLIP's default: beam search
    ends = (ids == EOS_TOKEN_ID).int().argmax(-1)
    assert (ids[:, 0] == 49406).all() and ends.min() < ends.max()  # ended at different lengths
    assert all((row[end + 1 :] == 0).all() for row, end in zip(ids, ends.tolist()))
    with pytest.raises(ValueError, match="multiple of num_beam_groups"):
        ours.generate(_images(1), num_beams=6, num_beam_groups=4)
    with pytest.raises(ValueError, match="`text` is for 'top_k' and 'top_p'"):
        ours.generate(_images(1), text=torch.tensor([49406]))


def test_prompt_and_one_dimensional_text_match_open_clip(open_clip_generate):
    ref, ours = _pair(3, eos_bias=True)
    images = _images(2)
    prompt = torch.tensor([[49406, 320, 1125], [49406, 320, 2368]])
    for text in (prompt, prompt[0]):
        img = images if text.dim() == 2 else images[:1]
        torch.manual_seed(5)
        theirs = ref.generate(img, text=text, generation_type="top_k", top_k=4, seq_len=15)
        torch.manual_seed(5)
        got = generate(ours, img, text=text, generation_type="top_k", top_k=4, seq_len=15)
        assert got.dim() == text.dim() and torch.equal(got, theirs)


def test_an_explicit_generator_leaves_the_global_one_alone():
    _, ours = _pair()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = ours.generate(_images(2), generation_type="top_p", top_p=0.9, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), before)
    b = ours.generate(_images(2), generation_type="top_p", top_p=0.9, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


def test_training_mode_is_restored():
    _, ours = _pair()
    ours.train()
    try:
        ours.generate(_images(1), seq_len=8)
        assert ours.training
    finally:
        ours.eval()  # the pair is shared between tests


def test_bad_settings_are_refused():
    _, ours = _pair()
    images = _images(1)
    with pytest.raises(ValueError, match="not one of beam_search, top_p, top_k"):
        ours.generate(images, generation_type="greedy")
    with pytest.raises(ValueError, match="seq_len .5. must be larger than min_seq_len .5."):
        ours.generate(images, seq_len=5)
    with pytest.raises(ValueError, match=r"top_p must lie in \[0, 1\]"):
        ours.generate(images, generation_type="top_p", top_p=1.5)
    plain = CLIP(tiny_config(get_preset("ViT-B-32")))
    with pytest.raises(ValueError, match="only CoCa models can generate captions"):
        plain.generate(images)


# --- `clipworks caption` (registered by clipworks.cli; here through its own add_commands) ---


def _caption_parser():
    from clipworks.caption_commands import add_commands
    from clipworks.cli import Parser

    parser = Parser(prog="clipworks")
    add_commands(parser.add_subparsers(dest="command"))
    return parser


@pytest.fixture(scope="module")
def tiny_coca_dir(tmp_path_factory):
    from clipworks.checkpoints.export import save_pretrained

    _, ours = _pair(0, eos_bias=True)
    return save_pretrained(ours, tmp_path_factory.mktemp("coca") / "tiny")


def _write_images(folder, n: int) -> list[str]:
    from PIL import Image

    g = torch.Generator().manual_seed(2)
    paths = []
    for i in range(n):
        pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        paths.append(str(folder / f"img{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


def test_caption_prints_each_readable_image_and_counts_the_rest(tiny_coca_dir, tmp_path, capsys):
    import clipworks
    from clipworks.caption_commands import captions_text

    paths = _write_images(tmp_path, 3)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    argv = ["caption", "--model", f"local-dir:{tiny_coca_dir}", "--device", "cpu", "--batch-size", "2",
            paths[0], str(tmp_path / "broken.jpg"), paths[1], str(tmp_path / "missing.png"), paths[2]]  # fmt: skip
    args = _caption_parser().parse_args(argv)
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    lines = [line.split("\t") for line in out.splitlines()]
    assert [path for path, _ in lines] == paths
    assert "2 unreadable images skipped" in err and "broken.jpg" in err and "missing.png" in err
    # the library's captions (beam search, the default), batched as the command batches (readable: 1, then 1 + 1)
    model, _, preprocess = clipworks.create_model_and_transforms(f"local-dir:{tiny_coca_dir}")
    tokenizer = clipworks.get_tokenizer(model)
    from clipworks.data.decode import load_image

    images = torch.stack([preprocess(load_image(p)) for p in paths])
    expected = []
    for batch in (images[:1], images[1:]):
        expected += captions_text(tokenizer, model.generate(batch))
    assert [caption for _, caption in lines] == expected
    assert all("<start_of_text>" not in c and "<end_of_text>" not in c for c in expected)


def test_caption_sampling_follows_the_seed(tiny_coca_dir, tmp_path, capsys):
    paths = _write_images(tmp_path, 2)
    base = ["caption", "--model", f"local-dir:{tiny_coca_dir}", "--device", "cpu", "--generation", "top_p",
            "--top-p", "0.95", "--max-length", "12", *paths]  # fmt: skip
    runs = []
    for seed in ("1", "1", "2"):
        args = _caption_parser().parse_args([*base, "--seed", seed])
        assert args.func(args) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] != runs[2]


def test_caption_refusals(tiny_coca_dir, tmp_path):
    from clipworks.cli import CommandFailed, UsageError

    parser = _caption_parser()
    (tmp_path / "broken.jpg").write_bytes(b"not an image")

    def run(*argv):
        args = parser.parse_args(["caption", "--device", "cpu", *argv])
        return args.func(args)

    with pytest.raises(UsageError, match="--random-init"):
        run("--model", "coca_ViT-B-32", "x.png")
    with pytest.raises(UsageError, match="--max-length must be more than 5"):
        run("--model", f"local-dir:{tiny_coca_dir}", "--max-length", "5", "x.png")
    with pytest.raises(CommandFailed, match="none of the 1 images"):
        run("--model", f"local-dir:{tiny_coca_dir}", str(tmp_path / "broken.jpg"))
    with pytest.raises(UsageError, match="--num-beams .4. must be at least 2 and a multiple of --num-beam-groups .3."):
        run("--model", f"local-dir:{tiny_coca_dir}", "--num-beams", "4", "x.png")
    with pytest.raises(SystemExit):
        parser.parse_args(["caption", "--model", "m", "--generation", "greedy", "x.png"])


def test_generation_flags_need_a_coca_model(tmp_path):
    from clipworks.checkpoints.export import save_pretrained
    from clipworks.cli import UsageError

    path = save_pretrained(CLIP(tiny_config(get_preset("ViT-B-32"))), tmp_path / "clip")
    args = _caption_parser().parse_args(["caption", "--model", f"local-dir:{path}", "--device", "cpu", "--generation",
                                         "top_k", "--no-cache", "x.png"])  # fmt: skip
    with pytest.raises(UsageError, match="has no caption decoder: it captions by matching phrases"):
        args.func(args)
