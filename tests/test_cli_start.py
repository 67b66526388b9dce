"""The command line's start: `import clipworks` loads no torch, and OpenMP's spin is set before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import os, sys
import clipworks, clipworks.cli
assert "torch" not in sys.modules, "importing clipworks loaded torch"
print(clipworks.cli.configure_openmp(), os.environ.get("GOMP_SPINCOUNT"))
clipworks.CLIP  # the public names still resolve, loading torch on first use
print("torch" in sys.modules, clipworks.cli.configure_openmp())
"""


def _probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True)  # fmt: skip
    return out.stdout.split()


def test_the_command_line_shortens_openmps_spin_before_torch_loads():
    assert _probe() == ["True", "1000", "True", "False"]  # set once; after torch has loaded it is too late


def test_a_users_openmp_setting_is_kept():
    assert _probe(GOMP_SPINCOUNT="5000")[:2] == ["False", "5000"]
    assert _probe(OMP_WAIT_POLICY="ACTIVE")[:2] == ["False", "None"]


def test_every_public_name_resolves():
    import clipworks

    for name in clipworks.__all__:
        assert getattr(clipworks, name) is not None, name
    assert set(clipworks.__all__) <= set(dir(clipworks))


def _clipworks(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipworks.cli", *args], capture_output=True, text=True, **kwargs)


def test_version_answers_without_torch():
    import clipworks

    out = _clipworks("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"clipworks {clipworks.__version__}"


def test_a_closed_pipe_ends_quietly():
    listing = subprocess.Popen([sys.executable, "-m", "clipworks.cli", "models"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)  # fmt: skip
    listing.stdout.readline()  # like `| head -1`: read one line, then go away
    listing.stdout.close()
    err = listing.stderr.read().decode()
    assert listing.wait(timeout=120) == 1 and err == "", err


HELP_PROBE = """
import sys, time
start = time.perf_counter()
from clipworks.cli import main
for argv in (["--help"], *([c, "--help"] for c in sys.argv[1:])):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
    if argv == ["--help"]:
        took = time.perf_counter() - start
assert "torch" not in sys.modules, "--help loaded torch"
print(f"{took:.3f}", file=sys.stderr)
"""


def test_help_answers_without_torch_at_once():
    commands = ["models", "demo", "tokenize", "convert", "train", "classify", "score", "eval", "benchmark", "caption", "embed",
                "index", "dedup", "serve"]  # fmt: skip
    out = subprocess.run([sys.executable, "-c", HELP_PROBE, *commands], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: clipworks [-h] [--version] COMMAND" in out.stdout and "usage: clipworks serve" in out.stdout
    took = float(out.stderr.strip().splitlines()[-1])
    assert took < 0.5, f"`clipworks --help` took {took:.2f} s after the interpreter started"
