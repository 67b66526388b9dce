"""The package as pip installs it: the wheel's metadata declares every third-party module clipworks imports, the
core covers what the main job (train), classify, demo and eval import, each command imports only the core and the
extras its --help names, and the licence files and py.typed ship."""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.metadata as md
import json
import os
import re
import socket
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
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
# Distributions a dependency imports whenever they are installed (a guarded import of its own), by dependency:
# timm.utils.summary tries `import wandb` (which loads pydantic).
DEPENDENCY_PROBES = {"timm": {"wandb"}}
# Modules a compiled dependency imports whenever they are installed: its Cython code has no Python frame, so the
# recorder puts the import on the clipworks line that called it. pyarrow asks whether its inputs are pandas objects.
COMPILED_PROBES = {"pandas": "pyarrow"}


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


@functools.cache
def _packages() -> dict[str, list[str]]:
    return md.packages_distributions()  # reads every installed distribution's file list: once


def _distribution(module: str) -> str:
    dists = _packages().get(module)
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
    assert out.returncode == 1 and len(lines) == 1, out.stderr  # a run-time failure, not a bad command line
    assert "pyarrow" in lines[0] and "pip install 'clipworks[search]'" in lines[0], lines[0]


# Every command, run in a fresh process under tests/import_recorder.py on small files the earlier ones wrote ({t}:
# the test's folder; `train` writes the model the later ones load, {model}). The runs of a stage go two at a time.
COMMAND_RUNS = (
    (("train", "--run.steps", "2", "--out", "{t}/run", "--quiet", "--device", "cpu", "--batch-size", "8",
      "--data.workers", "0", "--data.eval_size", "8", "--model.embed_dim", "16", "--model.vision_width", "32",
      "--model.text_width", "32", "--model.vision_layers", "1", "--model.text_layers", "1"),
     ("models",)),
    (("convert", "--model", "{model}", "--to", "onnx", "--out", "{t}/onnx"),
     ("eval", "zeroshot", "--model", "{model}", "--data", "folder:{t}/photos", "--out", "{t}/zeroshot", "--quiet",
      "--no-cache", "--templates", "photo"),
     ("eval", "fit-score", "--model", "{model}", "--data", "csv:{t}/rated.csv?score=score", "--out",
      "{t}/head.safetensors", "--quiet", "--no-cache", "--epochs", "2"),
     ("embed", "--model", "{model}", "--data", "folder:{t}/photos", "--out", "{t}/emb", "--quiet", "--workers", "0"),
     ("classify", "--model", "{model}", "--labels", "red,blue", "{t}/photos/red/1.jpg"),
     ("demo", "--model", "{model}"),
     ("convert", "--model", "{model}", "--to", "open_clip", "--out", "{t}/open_clip"),
     ("tokenize", "--model", "{model}", "a red thing")),
    (("index", "--embeddings", "{t}/emb", "--out", "{t}/index"),
     ("score", "--head", "{t}/head.safetensors", "{t}/photos/red/1.jpg"),
     ("benchmark", "--models", "{model},local-dir:{t}/open_clip", "--datasets", "folder:{t}/photos", "--out",
      "{t}/bench", "--quiet", "--device", "cpu")),
    (("serve", "--index", "{t}/index", "--model", "{model}", "--port", "{port}", "--int8"),
     ("dedup", "--index", "{t}/index"),
     ("caption", "--model", "coca_ViT-B-32", "--random-init", "--generation", "top_k", "--max-length", "6",
      "{t}/photos/red/1.jpg")),
)  # fmt: skip


def _run_commands(t: Path) -> dict[str, dict]:
    """What import_recorder.py wrote for each run of COMMAND_RUNS, by command line."""
    from PIL import Image

    rows = ["filepath,caption,score"]
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220))] * 2):
        image = Image.new("RGB", (40, 40), rgb)
        image.paste((255, 255, 255), (8 * i, 8 * i, 8 * i + 8, 8 * i + 8))
        path = t / "photos" / name / f"{i // 2}.{'jpg' if i >= 2 else 'png'}"  # a JPEG takes the fast decoder
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        rows.append(f"{path},a {name} thing,{i}")
    (t / "rated.csv").write_text("\n".join(rows) + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RECORDER_IMAGE": str(t / "photos/red/1.jpg")}
    fill = {"t": t, "model": f"local-dir:{t / 'run' / 'model'}", "port": port}

    def run(argv: tuple[str, ...]) -> tuple[str, dict]:
        argv = [a.format(**fill) for a in argv]
        key = " ".join(argv[:2] if argv[0] in ("eval", "convert") else argv[:1])
        key += f" --to {argv[argv.index('--to') + 1]}" if argv[0] == "convert" else ""
        out = t / f"{key.replace(' ', '_')}.json"
        done = subprocess.run([sys.executable, str(Path(__file__).parent / "import_recorder.py"), str(out), *argv],
                              capture_output=True, text=True, cwd=t, env=env, timeout=300)  # fmt: skip
        assert out.exists(), f"clipworks {' '.join(argv)} failed:\n{done.stderr[-3000:]}"
        result = json.loads(out.read_text())
        ok = result["status"] == 0 or (argv[0] == "serve" and result["status"] == "interrupted")
        assert ok, f"clipworks {' '.join(argv)} exited with {result['status']}:\n{done.stderr[-3000:]}"
        return key, {**result, "argv": argv}

    results = {}
    with ThreadPoolExecutor(2) as pool:
        for stage in COMMAND_RUNS:
            results.update(pool.map(run, stage))
    return results


def _requirement_closure(names: set[str]) -> set[str]:
    """`names` and every distribution they require, as installed here (markers evaluated, requested extras followed)."""
    from packaging.requirements import Requirement  # pytest's own dependency

    seen: set[tuple[str, str]] = set()
    todo = [(name, "") for name in names]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(_normal(req.name), e) for e in ("", *req.extras)]
    return {name for name, _ in seen}


def _help_extras(argv: list[str]) -> set[str]:
    """The extras `clipworks COMMAND [TASK] --help` names (its `needs:` part, from clipworks.cli.COMMAND_EXTRAS)."""
    from clipworks.cli import build_parser

    parser = build_parser()
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    text = parser.format_help()
    assert "\nneeds: " in text, f"{parser.prog} --help does not say which extras it needs"
    note = text[text.index("\nneeds: ") :]
    return {extra for group in re.findall(r"\[([a-z,]+)\]", note) for extra in group.split(",")}


def test_every_command_says_which_extras_it_needs_and_is_run_below():
    from clipworks.cli import COMMAND_EXTRAS, build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == set(COMMAND_EXTRAS), "every command, and only they, in clipworks.cli.COMMAND_EXTRAS"
    assert set(sub.choices) == {argv[0] for stage in COMMAND_RUNS for argv in stage}, "COMMAND_RUNS misses some"
    for name in sub.choices:
        required, _ = COMMAND_EXTRAS[name]
        assert _help_extras([name]) >= set(required), name


def test_each_command_imports_only_the_core_and_the_extras_its_help_names(metadata, tmp_path):
    """Each command, run for real: every third-party module a clipworks module imports on its way is a core
    requirement of the wheel or in an extra the command's --help names; and every distribution of the extras it
    ends up with loaded (a dependency may load one for it: torch.utils.tensorboard loads tensorboard, fastapi's
    forms python-multipart) is one those extras or the core bring. PROBED accelerators (used when installed, the
    same results without) need no extra."""
    results = _run_commands(tmp_path)
    serve = next(r for key, r in results.items() if key == "serve")
    assert len(serve["answers"]) == 6 and all(s == 200 for s, _ in serve["answers"].values()), serve["answers"]
    extras = {name: dists for name, dists in metadata["extras"].items() if name != "dev"}
    of_extra = {dist: name for name, dists in extras.items() for dist in dists}
    probed = {module for _, module in PROBED}
    problems = []
    for key, result in results.items():
        named = _help_extras(result["argv"])
        assert named <= set(extras), f"clipworks {key} --help names extras the wheel lacks: {named - set(extras)}"
        allowed = metadata["core"].union(*(extras[e] for e in named))
        names = f"[{', '.join(sorted(named))}]" if named else "no extra"
        for importer, line, module in result["imports"]:
            top = module.split(".")[0]
            path = "/".join(importer.split(".")[1:])  # as PROBED names it: data/jpeg.py
            path = f"{path}/__init__.py".lstrip("/") if (PACKAGE / path).is_dir() else f"{path}.py"
            if top in sys.stdlib_module_names or top in ("clipworks", "__future__") or (path, top) in PROBED:
                continue
            if top in COMPILED_PROBES and _distribution(COMPILED_PROBES[top]) in allowed:
                continue
            dist = _distribution(top)
            if dist not in allowed:
                where = f"[{of_extra[dist]}]" if dist in of_extra else "no extra"
                problems.append(f"clipworks {key}: {path}:{line} imports {module} ({dist}, in {where}); "
                                f"its --help names {names}")  # fmt: skip
        closure = _requirement_closure(allowed)
        closure |= _requirement_closure({p for dep, probed in DEPENDENCY_PROBES.items() if dep in closure for p in probed})
        for top in result["loaded"]:
            for dist in map(_normal, _packages().get(top, ()) if top not in probed else ()):
                if dist in of_extra and dist not in closure:
                    problems.append(f"clipworks {key}: loads {top} ({dist}, in [{of_extra[dist]}]), which neither "
                                    f"the core nor its extras require; its --help names {names}")  # fmt: skip
    assert not problems, "\n".join(problems)
