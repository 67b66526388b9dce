#!/usr/bin/env bash
# A side environment where OpenCLIP 3.3.0's beam search runs: transformers 4.56.2 (the last release whose
# BeamSearchScorer OpenCLIP can import; 4.57 stopped exporting it, 5.x removed it) with the versions of its
# dependencies it accepts, installed into tests/side_env/site and put in front of the project's .venv by PYTHONPATH.
# Everything else, torch and open_clip included, is the .venv's own: the same binaries run both sides of the
# comparison (tests/test_coca_generate.py runs tests/side_env/open_clip_generate.py under it).
# Usage: tests/side_env/setup.sh   (needs the package index once; the tests skip while the site is absent)
set -euo pipefail
cd "$(dirname "$0")"
../../.venv/bin/python -m pip install --quiet --target site --upgrade \
    "transformers==4.56.2" "tokenizers>=0.22,<0.23" "huggingface_hub>=0.34,<1.0" --no-deps
PYTHONPATH=site ../../.venv/bin/python -c "
import transformers, open_clip.coca_model as m
assert m._has_transformers, 'OpenCLIP still cannot import its generation classes'
print('side env ready: transformers', transformers.__version__)"
