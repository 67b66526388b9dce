"""The text encoders of single-file diffusion checkpoints (SD 1.x, SD 2.x, SDXL, SD3, Flux), read without the rest.

Most Stable Diffusion models are shared as one file holding the UNet (or DiT), the VAE and the text encoders
under prefixes that name the original training code's modules. The prefixes and layouts are those diffusers'
`loaders/single_file_utils.py` reads:

| family | prefix | layout | tower |
|---|---|---|---|
| sd1 | `cond_stage_model.transformer.` | transformers `CLIPTextModel` | CLIP ViT-L/14 text |
| sd2 | `cond_stage_model.model.` | OpenCLIP text tower | OpenCLIP ViT-H/14 text |
| sdxl | `conditioner.embedders.0.transformer.`, `conditioner.embedders.1.model.` | transformers, OpenCLIP | L, bigG |
| sdxl_refiner | `conditioner.embedders.0.model.` | OpenCLIP | bigG |
| sd3 | `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` | transformers (T5EncoderModel) | L, bigG, T5 |
| flux | `text_encoders.{clip_l,t5xxl}.transformer.` | transformers (T5EncoderModel) | L, T5 |

The files hold no config, so each tower's is read from its tensor shapes: vocabulary and width from the token
embedding, context length from the position table, layers by counting blocks, MLP size from the first block.
Two things shapes cannot tell are fixed as in the released models: attention heads are `width / 64` (every
released tower: L 768/12, H 1024/16, bigG 1280/20), and the activation is `quick_gelu` for the OpenAI ViT-L/14
towers and `gelu` for OpenCLIP's H and bigG. SD3's and Flux's T5 encoder (T5 v1.1 XXL) is read the same way (sizes
from shapes; relative-attention distance and norm epsilon are T5 v1.1's) and built by conditioning/t5.py.

SD 2.x conditions on the penultimate layer of its 24-layer tower (the LDM config's `layer="penultimate"`):
like diffusers, which builds a 23-layer `CLIPTextModel`, the file's last block and its projection are dropped, so
the default `ClipSkip` (last layer, final-normed) reads what SD 2.x reads.

Only the text encoders' tensors are read: `.safetensors` through `safe_open` (memory-mapped, one tensor at a time);
`.ckpt`/`.pt`/`.pth`/`.bin` only through `torch.load(weights_only=True)` (memory-mapped for zip archives), which
refuses any file that would run code.
"""

from __future__ import annotations

import contextlib
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoints.io import (
    PICKLE_SUFFIXES,
    CheckpointError,
    check_safetensors_header,
    check_zip_archive,
    load_weights,
    one_line,
)
from ..config import TextConfig
from ..models import text as text_tower
from ..models.text import TextTransformer
from .encoders import convert_text_from_transformers
from .pipelines import PAD_END, PAD_ZERO, PromptReader, SDXLText, StableDiffusionText
from .t5 import T5Encoder, t5_encoder_from_transformers

HEAD_DIM = 64  # every released CLIP text tower's head size (the files hold no head count)
_T5_PREFIX = "text_encoders.t5xxl.transformer."
_DIT_MARKERS = {"sd3": "joint_blocks.", "flux": "double_blocks."}  # with or without `model.diffusion_model.`


@dataclass(frozen=True)
class _Slot:
    """Where one text encoder sits in a single file and how to read it."""

    name: str
    prefix: str
    layout: str  # "transformers" (CLIPTextModel keys) or "open_clip" (OpenCLIP text tower keys)
    act: str
    penultimate: bool = False  # SD 2.x: drop the last block and the projection (see the module docstring)


_CLIP_L = _Slot("clip_l", "text_encoders.clip_l.transformer.", "transformers", "quick_gelu")
_CLIP_G = _Slot("clip_g", "text_encoders.clip_g.transformer.", "transformers", "gelu")
_T5 = _Slot("t5", _T5_PREFIX, "t5", "")
# In detection order: the first family whose slots hold any key wins (SD3 before Flux: it has clip_g too).
FAMILIES: dict[str, tuple[_Slot, ...]] = {
    "sd1": (_Slot("text_encoder", "cond_stage_model.transformer.", "transformers", "quick_gelu"),),
    "sd2": (_Slot("text_encoder", "cond_stage_model.model.", "open_clip", "gelu", penultimate=True),),
    "sdxl": (
        _Slot("text_encoder", "conditioner.embedders.0.transformer.", "transformers", "quick_gelu"),
        _Slot("text_encoder_2", "conditioner.embedders.1.model.", "open_clip", "gelu"),
    ),
    "sdxl_refiner": (_Slot("text_encoder_2", "conditioner.embedders.0.model.", "open_clip", "gelu"),),
    "sd3": (_CLIP_L, _CLIP_G, _T5),
    "flux": (_CLIP_L, _T5),
}
PREFIXES = tuple(dict.fromkeys(s.prefix for slots in FAMILIES.values() for s in slots))


@dataclass(frozen=True)
class SingleFileInfo:
    """What a single-file checkpoint holds.

    Attributes:
        path: the file.
        family: "sd1", "sd2", "sdxl", "sdxl_refiner", "sd3" or "flux".
        encoders: the text encoders present, by name ("text_encoder", "text_encoder_2" for SD 1.x/2.x/XL; "clip_l",
            "clip_g", "t5" for SD3/Flux, the names the file uses).
        prefixes: each present encoder's key prefix in the file.
        tensors: the number of tensors in the file.
    """

    path: Path
    family: str
    encoders: tuple[str, ...]
    prefixes: dict[str, str]
    tensors: int


# --- reading: keys first, then only the tensors asked for ---


@contextlib.contextmanager
def _open(path: str | os.PathLike) -> Iterator[tuple[list[str], Callable[[str], Tensor]]]:
    """(the file's keys, a function reading one tensor), reading nothing else. The file is checked first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        check_safetensors_header(path)
        try:
            f = safe_open(str(path), framework="pt", device="cpu")
            keys = list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        yield keys, f.get_tensor
        return
    if suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint format {suffix!r}; expected .safetensors or "
                              f"{PICKLE_SUFFIXES}")  # fmt: skip
    sd = _load_pickled(path)
    yield list(sd), sd.__getitem__


def _load_pickled(path: Path) -> dict[str, Tensor]:
    """A pickled checkpoint's tensors through `torch.load(weights_only=True)` only, memory-mapped when it is a zip
    archive (so the UNet's tensors are never read); SD's `{"state_dict": ...}` wrapper is unwrapped."""
    from ..checkpoints.torchscript import is_torchscript

    archive = zipfile.is_zipfile(path)
    if archive:
        check_zip_archive(path)
        if is_torchscript(path):
            raise CheckpointError(f"{path}: a TorchScript archive, not a single-file diffusion checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=archive)
    except Exception as e:  # the unpickler raises many types; all mean "not a safe plain checkpoint"
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {one_line(e)}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _detect(path: Path, keys: list[str]) -> SingleFileInfo:
    family = next((f for f, slots in FAMILIES.items() if any(k.startswith(_prefixes(slots)) for k in keys)), None)
    if family is None:
        raise CheckpointError(f"{path}: no text encoder found; looked for keys under {', '.join(PREFIXES)} "
                              f"({len(keys)} tensors, e.g. {sorted(keys)[:3]})")  # fmt: skip
    if family in ("sd3", "flux"):  # both have clip_l and t5; SD3 has clip_g, or else its DiT's keys tell
        clip_g = any(k.startswith(_CLIP_G.prefix) for k in keys)
        family = "sd3" if clip_g or _dit_family(keys) == "sd3" else "flux"
    present = [s for s in FAMILIES[family] if any(k.startswith(s.prefix) for k in keys)]
    return SingleFileInfo(path, family, tuple(s.name for s in present), {s.name: s.prefix for s in present}, len(keys))


def _prefixes(slots: tuple[_Slot, ...]) -> tuple[str, ...]:
    return tuple(s.prefix for s in slots)


def _dit_family(keys: list[str]) -> str | None:
    """"sd3" or "flux" from the diffusion transformer's keys; None when the file holds none."""
    for family, marker in _DIT_MARKERS.items():
        if any(k.startswith((marker, f"model.diffusion_model.{marker}")) for k in keys):
            return family
    return None


def inspect_single_file(path: str | os.PathLike) -> SingleFileInfo:
    """The family of a single-file checkpoint and the text encoders it holds, from its keys alone.

    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError: an unreadable or unsafe file, or one holding no text encoder (the prefixes looked for named).
    """
    with _open(path) as (keys, _):
        return _detect(Path(path), keys)


# --- building clipworks towers ---


def _infer_config(ours: dict[str, Tensor], act: str, where: str) -> TextConfig:
    """A TextConfig from a tower's tensor shapes (our keys); see the module docstring for heads and activation."""
    vocab, width = ours["token_embed.weight"].shape
    blocks = {int(m.group(1)) for k in ours if (m := re.match(r"transformer\.blocks\.(\d+)\.", k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise CheckpointError(f"{where}: transformer blocks {sorted(blocks)[:8]} are not 0..N-1")
    if width % HEAD_DIM:
        raise CheckpointError(f"{where}: width {width} is not a multiple of the head size {HEAD_DIM}")
    hidden = ours["transformer.blocks.0.mlp.fc1.weight"].shape[0]
    return TextConfig(
        context_length=ours["pos_embed"].shape[0], vocab_size=vocab, width=width, layers=len(blocks),
        heads=width // HEAD_DIM, mlp_ratio=hidden / width, act=act, pool="argmax", eos_id=vocab - 1,
    )  # fmt: skip


def _convert(slot: _Slot, sd: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """A tower's tensors (prefix removed) to TextTransformer keys."""
    sd = {k: v for k, v in sd.items() if not k.endswith(("attn_mask", "logit_scale", "position_ids"))}
    try:
        if slot.layout == "open_clip":
            return text_tower.convert_from_open_clip(sd)
        return convert_text_from_transformers(sd)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: {one_line(e)}") from e


def _penultimate(ours: dict[str, Tensor]) -> dict[str, Tensor]:
    """SD 2.x's tower without its last block and projection (it conditions on the penultimate layer)."""
    last = max(int(m.group(1)) for k in ours if (m := re.match(r"transformer\.blocks\.(\d+)\.", k)))
    return {k: v for k, v in ours.items() if not k.startswith((f"transformer.blocks.{last}.", "proj."))}


def _build(slot: _Slot, sd: dict[str, Tensor], where: str) -> TextTransformer:
    ours = _convert(slot, sd, where)
    if "token_embed.weight" not in ours or "pos_embed" not in ours:
        raise CheckpointError(f"{where}: no token or position embedding; keys {sorted(sd)[:6]}")
    if slot.penultimate:
        ours = _penultimate(ours)
    cfg = _infer_config(ours, slot.act, where)
    embed = ours["token_embed.weight"]
    if "proj.weight" not in ours:  # no projection (CLIPTextModel, SD3's clip_l): pooled = the normed end state
        ours["proj.weight"] = torch.eye(cfg.width, dtype=embed.dtype, device=embed.device)
    with torch.device("meta"):  # no random init to throw away: load_weights assigns the tensors
        encoder = TextTransformer(cfg, ours["proj.weight"].shape[0]).to(embed.dtype)
    load_weights(encoder, ours, source=where)
    return encoder.eval()


_T5_BLOCK0 = "encoder.block.0.layer."


def _t5_config(sd: dict[str, Tensor], where: str) -> dict[str, object]:
    """A transformers T5Config dict read from a T5 encoder's shapes. Not in the shapes, and T5 v1.1's (SD3's and
    Flux's T5-XXL) values: relative_attention_max_distance 128, layer_norm_epsilon 1e-6."""
    embed = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    rel = sd.get(f"{_T5_BLOCK0}0.SelfAttention.relative_attention_bias.weight")
    if embed is None or rel is None:
        raise CheckpointError(f"{where}: not a T5 encoder (no shared.weight or block 0's relative attention bias)")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    gated = f"{_T5_BLOCK0}1.DenseReluDense.wi_0.weight"
    ff = sd.get(gated, sd.get(f"{_T5_BLOCK0}1.DenseReluDense.wi.weight"))
    return {
        "model_type": "t5", "vocab_size": embed.shape[0], "d_model": embed.shape[1], "num_layers": len(layers),
        "num_heads": rel.shape[1], "relative_attention_num_buckets": rel.shape[0],
        "d_kv": sd[f"{_T5_BLOCK0}0.SelfAttention.q.weight"].shape[0] // rel.shape[1],
        "d_ff": ff.shape[0] if ff is not None else 0, "feed_forward_proj": "gated-gelu" if gated in sd else "relu",
    }  # fmt: skip


def _build_t5(sd: dict[str, Tensor], where: str) -> T5Encoder:
    try:
        return t5_encoder_from_transformers(_t5_config(sd, where), sd)
    except ValueError as e:
        raise CheckpointError(f"{where}: {one_line(e)}") from e


def _read(get: Callable[[str], Tensor], keys: list[str], prefix: str, device, dtype) -> dict[str, Tensor]:
    """The tensors under `prefix` (prefix removed), each moved and cast as it is read."""
    out = {}
    for key in keys:
        if key.startswith(prefix):
            t = get(key)
            out[key[len(prefix) :]] = t.to(device=device, dtype=dtype if t.is_floating_point() and dtype else None)
    return out


def load_single_file_text_encoders(path: str | os.PathLike, device: str | torch.device | None = None,
                                   dtype: torch.dtype | None = None) -> dict[str, torch.nn.Module]:  # fmt: skip
    """The text encoders of a single-file checkpoint, in eval mode: clipworks CLIP text towers (`TextTransformer`)
    and, for SD3/Flux, the T5 encoder (`T5Encoder`, see conditioning/t5.py).

    Args:
        device: where the encoders' tensors go, each as it is read (default: CPU).
        dtype: the encoders' floating dtype (default: the file's).

    Returns:
        The encoders by `SingleFileInfo.encoders`' names ("text_encoder", "text_encoder_2", "clip_l", "clip_g", "t5").

    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError: an unreadable or unsafe file, no text encoder, or an encoder whose tensors do not fit.
    """
    with _open(path) as (keys, get):
        info = _detect(Path(path), keys)
        out: dict[str, torch.nn.Module] = {}
        for slot in (s for s in FAMILIES[info.family] if s.name in info.encoders):
            sd, where = _read(get, keys, slot.prefix, device, dtype), f"{path} [{slot.prefix}*]"
            out[slot.name] = _build_t5(sd, where) if slot.layout == "t5" else _build(slot, sd, where)
        return out


def load_single_file_t5_weights(path: str | os.PathLike, device: str | torch.device | None = None,
                                dtype: torch.dtype | None = None) -> dict[str, Tensor]:  # fmt: skip
    """The T5 encoder's tensors of an SD3/Flux single file, in transformers `T5EncoderModel` keys
    (`text_encoders.t5xxl.transformer.` removed, as diffusers' `convert_sd3_t5_checkpoint_to_diffusers` does), for
    use with transformers; `load_single_file_text_encoders` builds clipworks' T5 encoder from them.

    Raises:
        CheckpointError: the file holds no T5 encoder (or no text encoder at all).
    """
    with _open(path) as (keys, get):
        info = _detect(Path(path), keys)
        if "t5" not in info.encoders:
            raise CheckpointError(f"{path}: no T5 encoder (no keys under {_T5_PREFIX}); it holds {info.encoders}")
        return _read(get, keys, _T5_PREFIX, device, dtype)


def load_stable_diffusion_text(path: str | os.PathLike, reader: PromptReader | None = None,
                               device: str | torch.device | None = None,
                               dtype: torch.dtype | None = None) -> StableDiffusionText:  # fmt: skip
    """SD 1.x/2.x's text conditioning from a single file, with the family's padding (SD 2.x's OpenCLIP tokenizer
    pads with 0, SD 1.x's with the end token).

    Raises:
        CheckpointError: not an SD 1.x/2.x file (the family found is named).
    """
    info = inspect_single_file(path)
    if info.family not in ("sd1", "sd2"):
        raise CheckpointError(f"{path}: a {info.family} checkpoint; load_stable_diffusion_text reads sd1 or sd2 files"
                              + (" (use load_sdxl_text)" if info.family == "sdxl" else ""))  # fmt: skip
    encoder = load_single_file_text_encoders(path, device, dtype)["text_encoder"]
    return StableDiffusionText(encoder, reader, pad_id=PAD_END if info.family == "sd1" else PAD_ZERO)


def load_sdxl_text(path: str | os.PathLike, reader: PromptReader | None = None,
                   device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> SDXLText:  # fmt: skip
    """SDXL's text conditioning (both towers) from a single file.

    Raises:
        CheckpointError: not an SDXL base file with both text encoders (what was found is named).
    """
    info = inspect_single_file(path)
    if info.family != "sdxl" or len(info.encoders) != 2:
        raise CheckpointError(f"{path}: a {info.family} checkpoint holding {info.encoders}; load_sdxl_text needs an "
                              "sdxl file with text_encoder and text_encoder_2")  # fmt: skip
    encoders = load_single_file_text_encoders(path, device, dtype)
    return SDXLText(encoders["text_encoder"], encoders["text_encoder_2"], reader)
