"""ONNX export of CLIP's image and text encoders, and an ONNX Runtime runner for the exported pair.

`export_onnx` writes a directory holding `image_encoder.onnx`, `text_encoder.onnx` and `onnx_config.json`;
`load_onnx` reads it back as an `OnnxEncoder` with `encode_image` / `encode_text`, like the PyTorch model's.

Exporter: `torch.onnx.export(dynamo=True)`, torch's default, which captures the graph with `torch.export`
and translates it with onnxscript. It is used rather than the legacy TorchScript tracer because
`torch.export` checks the batch dimension symbolically (an export that specialised it would fail instead of
baking a constant into the graph), the tracer is deprecated, and with onnxscript's optimiser on the graphs
run as fast in ONNX Runtime as the tracer's. Its costs: opset 18 or later, and a slower export (seconds for
a tiny model, about 10 s per ViT-B-32 tower on two cores).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoints.io import atomic_directory
from .config import CLIPConfig, PreprocessConfig

FORMAT = "clipworks-onnx"
FORMAT_VERSION = 1
CONFIG_FILE = "onnx_config.json"
IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
IMAGE_INPUT, IMAGE_OUTPUT = "pixel_values", "image_embeds"
TEXT_INPUT, TEXT_OUTPUT = "input_ids", "text_embeds"
MIN_OPSET = 18  # the dynamo exporter emits opset 18+; onnx's down-converter fails on its graphs (Reduce* axes)
# protobuf caps a message at 2 GiB: a tower with more weight than this keeps them in `<file>.data` beside it.
EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB, room left for the graph itself
# torch.export specialises dimensions of size 0 and 1, so the example batch must be larger to stay dynamic.
EXAMPLE_BATCH = 2
_INSTALL_HINT = "pip install 'clipworks[onnx]'"


@dataclass(frozen=True)
class OnnxExport:
    """What `export_onnx` wrote.

    Attributes:
        path: the export directory.
        image_path: the image encoder, `pixel_values` (B, 3, S, S) float32 -> `image_embeds` (B, E).
        text_path: the text encoder, `input_ids` (B, context_length) int64 -> `text_embeds` (B, E).
        config_path: `onnx_config.json`: model and preprocessing configs, names, opset.
        opset: the ONNX opset both graphs use.
    """

    path: Path
    image_path: Path
    text_path: Path
    config_path: Path
    opset: int
    image_input: str = IMAGE_INPUT
    image_output: str = IMAGE_OUTPUT
    text_input: str = TEXT_INPUT
    text_output: str = TEXT_OUTPUT


def _require(*names: str) -> list[Any]:
    """Import the optional ONNX packages, or say which extra installs them."""
    import importlib

    try:
        return [importlib.import_module(n) for n in names]
    except ImportError as e:
        raise ImportError(f"clipworks' ONNX support needs {', '.join(names)} ({e.name} is missing): "
                          f"{_INSTALL_HINT}") from e  # fmt: skip


class ImageEncoder(nn.Module):
    """`CLIP.encode_image` as a module with one input, the unit the exporter captures."""

    def __init__(self, model: nn.Module, normalize: bool):
        super().__init__()
        self.model = model
        self.normalize = normalize

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model.encode_image(pixel_values, normalize=self.normalize)  # (B, E)


class TextEncoder(nn.Module):
    """`CLIP.encode_text` without trimming padding: the graph runs every one of the context_length positions.

    `TextTransformer.forward` cuts the batch at its longest sequence with a Python int, which an exporter
    would freeze into the graph as the example batch's length; the features are the same either way, since
    trimming only drops columns no pooled position attends to.
    """

    def __init__(self, model: nn.Module, normalize: bool):
        super().__init__()
        self.text = model.text
        self.normalize = normalize

    def forward(self, input_ids: Tensor) -> Tensor:
        t = self.text
        mask = t.key_mask(input_ids)  # CoCa's padding-aware mask; None for the other towers
        x = t.transformer.forward_one(t.embed(input_ids), t.pool_index(input_ids), t.config.causal and mask is None,
                                      mask)  # (B, D)  # fmt: skip
        x = t.proj(t.ln_final(x))  # (B, E)
        return F.normalize(x, dim=-1) if self.normalize else x


def _check_opset(opset: int | None, onnx) -> None:
    if opset is None:
        return
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be an int from {MIN_OPSET} to {newest} (the exporter emits opset "
                         f"{MIN_OPSET}+, onnx {onnx.__version__} knows up to {newest}), got {opset!r}")  # fmt: skip


def _check_model(model: nn.Module) -> None:
    for name in ("visual", "text", "config"):
        if not hasattr(model, name):
            raise ValueError(f"export_onnx needs a clipworks CLIP model (with .visual, .text, .config), "
                             f"got {type(model).__name__} without .{name}")  # fmt: skip
    for name, what in (("visual", "image"), ("text", "text")):
        if getattr(model, name) is None:
            raise ValueError(f"export_onnx writes both towers' graphs; this model has no {what} tower (it was loaded "
                             "from a one-tower checkpoint)")  # fmt: skip
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"export_onnx exports float32 graphs; the model has parameters of {sorted(map(str, dtypes))}: "
                         "call model.float() first")  # fmt: skip


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _export_one(module: nn.Module, example: Tensor, path: Path, names: tuple[str, str], opset: int | None) -> int:
    """Export `module` with a dynamic batch dimension to `path`; the opset written."""
    import onnx

    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=[names[0]],
        output_names=[names[1]],
        opset_version=opset,
        dynamo=True,
        dynamic_shapes=({0: batch},),
        external_data=_weight_bytes(module) > EXTERNAL_DATA_BYTES,
        verbose=False,
    )
    proto = onnx.load(str(path), load_external_data=False)
    written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    # onnxscript logs, rather than raises, when it cannot convert to the requested opset.
    if opset is not None and written != opset:
        raise RuntimeError(f"asked for opset {opset} but the exporter wrote opset {written} for {path.name}")
    return written


def _write(model: nn.Module, tmp: Path, opset: int | None, normalize: bool) -> int:
    """Both graphs and the config into `tmp`; the opset used."""
    param = next(model.parameters())
    S, L = model.config.vision.image_size, model.config.text.context_length
    images = torch.randn(EXAMPLE_BATCH, 3, S, S, device=param.device)
    # Ids of the largest value end every example sequence, so every pooling rule finds a valid position.
    ids = torch.zeros(EXAMPLE_BATCH, L, dtype=torch.long, device=param.device)
    ids[:, -1] = model.config.text.vocab_size - 1
    # Fresh modules start in training mode; eval() keeps the model inside in eval mode as well.
    image = ImageEncoder(model, normalize).eval()
    text = TextEncoder(model, normalize).eval()
    image_opset = _export_one(image, images, tmp / IMAGE_FILE, (IMAGE_INPUT, IMAGE_OUTPUT), opset)
    text_opset = _export_one(text, ids, tmp / TEXT_FILE, (TEXT_INPUT, TEXT_OUTPUT), opset)
    assert image_opset == text_opset, (image_opset, text_opset)
    preprocess = getattr(model, "preprocess_config", None)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "preprocess": preprocess.to_dict() if preprocess is not None else None,
        "image": {"file": IMAGE_FILE, "input": IMAGE_INPUT, "output": IMAGE_OUTPUT, "shape": ["batch", 3, S, S]},
        "text": {"file": TEXT_FILE, "input": TEXT_INPUT, "output": TEXT_OUTPUT, "shape": ["batch", L]},
        "normalize": normalize,
        "opset": image_opset,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return image_opset


def export_onnx(
    model: nn.Module, out_dir: str | os.PathLike, *, opset: int | None = None, normalize: bool = False
) -> OnnxExport:
    """Export a CLIP model's image and text encoders as two ONNX graphs with a dynamic batch dimension.

    The directory appears complete or not at all: everything is written into a temporary sibling which is
    then renamed over `out_dir` (an earlier export there is replaced; any other non-empty directory is not).
    The model is exported in eval mode; each submodule's train/eval mode is restored afterwards.

    Args:
        model: a clipworks `CLIP` with float32 weights (on any device; the graphs are device-free).
        out_dir: the export directory.
        opset: ONNX opset, 18 or later; None for the exporter's default.
        normalize: bake the L2 normalisation into both graphs, so they return unit-norm features.

    Raises:
        ImportError: onnx, onnxruntime or onnxscript is missing.
        ValueError: an opset out of range; not a float32 CLIP model; `out_dir` a file, or a non-empty
            directory that is not an ONNX export.
    """
    onnx, _, _ = _require("onnx", "onnxruntime", "onnxscript")
    _check_opset(opset, onnx)
    _check_model(model)
    path = Path(out_dir)
    # Saved per module: model.train(mode) afterwards would flatten a mixed mode (say, a frozen tower) to one.
    modes = {m: m.training for m in model.modules()}
    try:
        with atomic_directory(path) as tmp:
            model.eval()
            with torch.no_grad():
                written = _write(model, tmp, opset, normalize)
    finally:
        for m, training in modes.items():
            m.training = training
    return OnnxExport(path, path / IMAGE_FILE, path / TEXT_FILE, path / CONFIG_FILE, written)


def _to_numpy(x: Tensor | np.ndarray, dtype: type) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize's eps


class OnnxEncoder:
    """An exported CLIP run by ONNX Runtime: numpy or torch arrays in, numpy features out.

    Args:
        path: a directory `export_onnx` wrote.
        providers: ONNX Runtime execution providers, in order of preference.
        session_options: an `onnxruntime.SessionOptions` (e.g. with `intra_op_num_threads`), or None for
            ONNX Runtime's defaults.

    Attributes:
        config: the model's architecture.
        preprocess_config: the image preprocessing the weights expect, if the export recorded one.
        normalized: whether the graphs themselves return unit-norm features.
    """

    def __init__(self, path: str | os.PathLike, *, providers=("CPUExecutionProvider",), session_options=None):
        (ort,) = _require("onnxruntime")
        self.path = Path(path)
        try:
            meta = json.loads((self.path / CONFIG_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.path} is not an ONNX export directory (no readable {CONFIG_FILE}): {e}") from e
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            found = f"format {meta.get('format')!r} version {meta.get('version')!r}"
            raise ValueError(f"{self.path}/{CONFIG_FILE}: {found}; expected {FORMAT!r} version {FORMAT_VERSION}")
        self.config = CLIPConfig.from_dict(meta["model"])
        self.preprocess_config = PreprocessConfig.from_dict(meta["preprocess"]) if meta["preprocess"] else None
        self.normalized = bool(meta["normalize"])
        self.opset = meta["opset"]
        self._image, self._text = meta["image"], meta["text"]
        self.image_session = ort.InferenceSession(str(self.path / self._image["file"]), session_options,
                                                  providers=list(providers))  # fmt: skip
        self.text_session = ort.InferenceSession(str(self.path / self._text["file"]), session_options,
                                                 providers=list(providers))  # fmt: skip

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    def encode_image(self, images: Tensor | np.ndarray, normalize: bool = False) -> np.ndarray:
        """Preprocessed images (B, 3, S, S) to features (B, E), float32."""
        x = _to_numpy(images, np.float32)
        S = self.image_size
        if x.ndim != 4 or x.shape[1:] != (3, S, S):
            raise ValueError(f"images must be (B, 3, {S}, {S}), got {x.shape}")
        (out,) = self.image_session.run([self._image["output"]], {self._image["input"]: x})
        return _l2_normalize(out) if normalize else out

    def encode_text(self, tokens: Tensor | np.ndarray, normalize: bool = False) -> np.ndarray:
        """Token ids (B, context_length), padded as the tokenizer pads them, to features (B, E), float32."""
        ids = _to_numpy(tokens, np.int64)
        L = self.context_length
        if ids.ndim != 2 or ids.shape[1] != L:
            raise ValueError(f"token ids must be (B, {L}) (the graph runs the full context), got {ids.shape}")
        (out,) = self.text_session.run([self._text["output"]], {self._text["input"]: ids})
        return _l2_normalize(out) if normalize else out


def load_onnx(path: str | os.PathLike, **kwargs) -> OnnxEncoder:
    """Open a directory `export_onnx` wrote; keyword arguments go to `OnnxEncoder` (providers, session_options)."""
    return OnnxEncoder(path, **kwargs)
