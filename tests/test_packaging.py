"""The package as pip installs it: the wheel's metadata declares every third-party module clipworks imports, the
core covers what the main job (train), classify, demo and eval import, and the licence files and py.typed ship."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "clipworks"
# What the core install must cover: the main job and the commands the README promises without extras. Modules
# under these paths may import only core distributions at module level or in their functions, unless the import
# is guarded (inside a `try` that names the extra on ImportError).
CORE_PATHS = ("train/", "data/", "eval/", "models/clip.py", "models/vit.py", "models/text.py", "models/layers.py",
              "tokenizer.py", "transforms.py", "factory.py", "demo.py", "cli.py", "config.py", "presets.py")  # fmt: skip
# Optional accelerators a core module uses only once a guarded probe found them: (file, module).
PROBED = {("data/jpeg.py", "simplejpeg")}  # `_available()` imports it under try/except; `_decode` runs after it


@pytest.fixture(scope="module")
def metadata(tmp_path_factory) -> dict:
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates PEP 639 metadata (needs >= 77)")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(out), str(ROOT)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = out.glob("clipworks-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        text = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    core, extras = set(), {}
    for line in text.splitlines():
        if line.startswith("Requires-Dist: "):
            spec = line[len("Requires-Dist: ") :]
            name = _normal(re.match(r"[A-Za-z0-9_.-]+", spec).group())
            extra = re.search(r'extra == "([^"]+)"', spec)
            (extras.setdefault(extra.group(1), set()) if extra else core).add(name)
    return {"core": core, "extras": extras, "files": names, "text": text}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, guarded by a try/except ImportError) of every import in a file."""
    tree = ast.parse(path.read_text())
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".")[0], id(node) in guarded) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], id(node) in guarded))
    return [(m, g) for m, g in found if m not in sys.stdlib_module_names and m != "clipworks"]


def _distribution(module: str) -> str:
    dists = md.packages_distributions().get(module)
    assert dists, f"{module} is imported but no installed distribution provides it"
    return _normal(dists[0])


def test_every_imported_module_is_declared(metadata):
    declared = metadata["core"].union(*metadata["extras"].values())
    missing = {}
    for path in PACKAGE.rglob("*.py"):
        for module, _ in _imports(path):
            if _distribution(module) not in declared:
                missing.setdefault(_distribution(module), []).append(str(path.relative_to(PACKAGE)))
    assert not missing, f"imported but not in the wheel's Requires-Dist (core or any extra): {missing}"


def test_the_core_covers_the_main_job_classify_demo_and_eval(metadata):
    unguarded = {}
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        if not rel.startswith(CORE_PATHS):
            continue
        for module, guarded in _imports(path):
            if not guarded and (rel, module) not in PROBED and _distribution(module) not in metadata["core"]:
                unguarded.setdefault(rel, []).append(module)
    assert not unguarded, f"core modules importing non-core distributions without naming the extra: {unguarded}"
    assert {"pyyaml", "tqdm", "torch", "pillow", "safetensors"} <= metadata["core"]


def test_the_search_extra_has_what_the_service_fetches_urls_with(metadata):
    assert {"httpx", "pyarrow", "faiss-cpu", "fastapi", "uvicorn"} <= metadata["extras"]["search"]


def test_licences_and_typing_marker_ship(metadata):
    files = metadata["files"]
    assert "clipworks/py.typed" in files
    assert any(f.endswith("licenses/LICENSE") for f in files)
    assert any(f.endswith("NOTICE-openai-clip.txt") and "licenses" in f for f in files)
    assert "clipworks/assets/bpe_simple_vocab_16e6.txt.gz" in files
    assert "License-Expression: MIT" in metadata["text"]


def test_the_command_lines_extra_table_matches_the_wheel(metadata):
    from clipworks.cli import EXTRA_OF_MODULE

    for module, extra in EXTRA_OF_MODULE.items():
        assert _distribution(module) in metadata["extras"][extra], (module, extra)


def test_a_missing_optional_module_names_its_extra(tmp_path):
    import numpy as np

    from clipworks.search.store import write_embeddings

    emb = tmp_path / "emb"
    write_embeddings(emb, np.eye(4, 8, dtype=np.float32), [{"key": str(i)} for i in range(4)], model="m")
    # `clipworks index` in a process where pyarrow cannot be imported (as after `pip install clipworks`)
    code = ("import sys; sys.modules['pyarrow'] = None; from clipworks.cli import main; "
            f"sys.exit(main(['index', '--embeddings', {str(emb)!r}, '--out', {str(tmp_path / 'idx')!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "pyarrow" in lines[0] and "pip install 'clipworks[search]'" in lines[0], lines[0]
