"""Reading the tensors of a TorchScript archive (OpenAI's CLIP `.pt` releases) without running its code.

A TorchScript archive is a zip holding `data.pkl` (the module tree, pickled), `data/<key>` (raw tensor
storages) and `code/` (the modules' TorchScript source). `torch.load` hands such a file to `torch.jit.load`,
which compiles and runs that code. Here the pickle is read by an unpickler that knows a short allow-list of
globals (tensor rebuilding, storage types, ordered dicts, TorchScript's list builders); the module classes
become inert attribute bags, anything else is refused. Which attributes are parameters and buffers is read
from the `__parameters__`/`__buffers__` lines of the source as text, never executed.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

from .io import CheckpointError, check_zip_archive, one_line

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_MAX_DEPTH = 100  # module nesting; a CLIP nests fewer than 10 deep
_CLASS_RE = re.compile(
    r"^class (\w+)\(Module\):\n(?:  .*\n)*?  __parameters__ = \[(.*?)\]\n  __buffers__ = \[(.*?)\]", re.MULTILINE
)


class _ScriptModule:
    """A TorchScript module object as data: its class name and its pickled attributes (no behaviour)."""

    qualname = ""
    attrs: dict = {}

    def __setstate__(self, state) -> None:
        self.attrs = dict(state)


def _module_class(qualname: str) -> type:
    return type("ScriptModule", (_ScriptModule,), {"qualname": qualname})


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> Tensor:
    size, stride = tuple(size), tuple(stride)
    ints = all(type(v) is int for v in (offset, *size, *stride))
    if not (ints and len(size) == len(stride) and offset >= 0 and min(size + stride, default=0) >= 0):
        raise CheckpointError(f"TorchScript archive has a tensor view with offset {offset}, size {size}, stride {stride}")
    # the last element a view reaches must lie inside its storage
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
    if end > storage.numel():
        raise CheckpointError(f"TorchScript archive has a tensor view (offset {offset}, size {size}, stride {stride}) "
                              f"past the end of its storage of {storage.numel()} elements")  # fmt: skip
    return storage.as_strided(size, stride, offset)


def _list(data, *args):
    return list(data)


_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("collections", "OrderedDict"): OrderedDict,
    **{("torch.jit._pickle", f"build_{kind}list"): _list for kind in ("int", "double", "bool", "tensor")},
    ("torch.jit._pickle", "restore_type_tag"): lambda value, type_str: value,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self.archive, self.root = archive, root
        self.storages: dict[str, Tensor] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return _module_class(f"{module}.{name}")
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise CheckpointError(f"TorchScript archive refers to {module}.{name}, which is not a tensor or module type")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"TorchScript archive has an unknown persistent record {pid!r}")
        if key not in self.storages:
            name = f"{self.root}/data/{key}"
            declared = numel * storage_type.dtype.itemsize if type(numel) is int and numel >= 0 else -1
            if self.archive.getinfo(name).file_size != declared:  # read nothing the pickle did not declare
                raise CheckpointError(f"TorchScript archive storage {key} holds {self.archive.getinfo(name).file_size} "
                                      f"bytes, not the {declared} its tensors declare")  # fmt: skip
            raw = bytearray(self.archive.read(name))
            flat = torch.frombuffer(raw, dtype=storage_type.dtype) if raw else torch.empty(0, dtype=storage_type.dtype)
            self.storages[key] = flat
        return self.storages[key]


def _tensor_attributes(archive: zipfile.ZipFile, root: str) -> dict[str, set[str]]:
    """Per module class qualname, the attribute names that are parameters or buffers, from the source text."""
    names: dict[str, set[str]] = {}
    for entry in archive.namelist():
        if not (entry.startswith(f"{root}/code/") and entry.endswith(".py")):
            continue
        module = entry[len(f"{root}/code/") : -len(".py")].replace("/", ".")
        for cls, params, buffers in _CLASS_RE.findall(archive.read(entry).decode("utf-8", "replace")):
            listed = re.findall(r'"([^"]+)"', params + buffers)
            names[f"{module}.{cls}"] = set(listed)
    return names


def _collect(obj: _ScriptModule, prefix: str, tensor_names: dict[str, set[str]], out: dict[str, Tensor],
             parents: tuple[int, ...] = ()) -> None:  # fmt: skip
    if id(obj) in parents:  # a pickle can make a module its own descendant
        raise CheckpointError(f"TorchScript module tree loops back on itself at {prefix[:-1][:80]!r}")
    if len(parents) > _MAX_DEPTH:
        raise CheckpointError(f"TorchScript modules nest deeper than {_MAX_DEPTH} at {prefix[:80]!r}")
    keep = tensor_names.get(obj.qualname, set())
    for name, value in obj.attrs.items():
        if isinstance(value, _ScriptModule):
            _collect(value, f"{prefix}{name}.", tensor_names, out, (*parents, id(obj)))
        elif isinstance(value, Tensor) and name in keep:
            out[prefix + name] = value.clone()  # own memory, not a view of the archive's buffer


def is_torchscript(path: str | Path) -> bool:
    """Whether `path` is a TorchScript archive: a zip with a `code/` folder beside its `data.pkl`."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.split("/")[1:2] == ["code"] for name in zf.namelist())


def load_torchscript_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The parameters and buffers of a TorchScript archive, by their dotted names, read without running code.

    Raises:
        CheckpointError: the archive is malformed, or its pickle refers to anything but tensors and modules.
    """
    check_zip_archive(Path(path))
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pickles:
                raise CheckpointError("TorchScript archive without data.pkl")
            root = pickles[0].split("/")[0]
            with archive.open(pickles[0]) as f:
                tree = _Unpickler(f, archive, root).load()
            tensor_names = _tensor_attributes(archive, root)
        if not isinstance(tree, _ScriptModule):
            raise CheckpointError("TorchScript archive does not hold a module")
        out: dict[str, Tensor] = {}
        _collect(tree, "", tensor_names, out)
    except CheckpointError as e:  # raised inside, where the file is not known
        raise CheckpointError(f"{path}: {e}") from e
    # RuntimeError: torch refusing a tensor; RecursionError: a pickle nested past Python's stack
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError, RuntimeError,
            RecursionError) as e:  # fmt: skip
        raise CheckpointError(f"{path}: unreadable TorchScript archive: {type(e).__name__}: {one_line(e)}") from e
    if not out:
        raise CheckpointError(f"{path}: TorchScript archive holds no parameters or buffers")
    return out
