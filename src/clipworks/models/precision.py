"""Inference precision: OpenCLIP's precision names (and "auto", "int8") applied to a built model, once, at load.

The names and what they mean (OpenCLIP's `create_model(precision=)`, `convert_weights_to_lp`, `LayerNormFp32`):

- "fp32": as built. OpenCLIP's "amp", "amp_bf16", "amp_bfloat16" also keep float32 parameters (autocast is the
  caller's, as in OpenCLIP); they resolve to "fp32".
- "bf16", "fp16": the weights of the matrix products (linear and convolution layers, the attention projections, the
  towers' projections) in the low dtype, so that the products run on the hardware's bf16/fp16 units; the
  normalisation layers computed in float32 (OpenCLIP's `LayerNormFp32`: the input cast to float32, normalised with
  float32 weights, cast back; on the CPU torch's kernel does that arithmetic without the copies).
- "pure_bf16", "pure_fp16": every parameter and buffer in the low dtype, normalisation layers included.
- "int8": `clipworks.quantize_int8` (the transformer blocks' linear layers as int8 products; the CPU only).
- "auto": `hardware.resolve_precision`: bf16 where the device computes it natively and the model is large enough
  to gain from it, else fp32; then, for a CLIP, bf16 is checked on the model's own weights (`AUTO_MIN_COSINE`):
  where its embeddings of a fixed probe batch fall below cosine 0.999 to the fp32 ones, the model stays fp32, and
  `model.precision_note` (and a `PrecisionWarning`) says so.

Which tensors stay float32 under "bf16"/"fp16", and why:

- The normalisation layers (LayerNorm, RMSNorm, GroupNorm, BatchNorm): their statistics (a mean and a variance
  over hundreds of values) lose digits in an 8-bit mantissa, and BatchNorm's running variances and LayerNorm's eps
  (1e-5, 1e-6) are small numbers a low dtype holds coarsely. Their weights and running statistics stay float32;
  LayerNorm/RMSNorm/GroupNorm cast their input to float32 and their output back (as OpenCLIP's `LayerNormFp32`);
  BatchNorm runs torch's mixed-dtype kernel (low-precision input, float32 parameters and arithmetic), as in
  OpenCLIP, whose `convert_weights_to_lp` leaves it float32.
- The logit scale and bias: exp(logit_scale) reaches 100, where bf16's spacing is 0.5; contrastive logits and
  SigLIP's sigmoid need them exact.
- The features `encode_image`/`encode_text` return with `normalize=True`: normalised in float32 and returned as
  float32 (OpenCLIP returns the low dtype), so that stored embeddings and cosine scores are not rounded twice.

Position embeddings, class tokens, token-embedding tables, attention-pool queries and ConvNeXt's layer scales are
stored in the low dtype. Each is added to (or multiplies) an activation that is already in the low dtype, and
OpenCLIP, which keeps its own ones float32, casts them to that dtype where they are used (`.to(x.dtype)`):
rounding once at load gives the same numbers as rounding on every call, so keeping them float32 would buy nothing.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hardware import AMP, CHOICES, NAMES, PRECISIONS, resolve_precision

__all__ = ["AMP", "AUTO_MIN_COSINE", "CHOICES", "NAMES", "PRECISIONS", "LayerNormFp32", "PrecisionWarning",
           "apply_precision", "check_precision", "is_fp32_norm", "model_dtype"]

LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "pure_bf16": torch.bfloat16, "pure_fp16": torch.float16}

# normalisation layers whose forward is wrapped to run in float32 (BatchNorm is not: see the module docstring)
_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)
_BATCH_NORMS = (nn.modules.batchnorm._NormBase,)


class LayerNormFp32(nn.LayerNorm):
    """OpenCLIP's `LayerNormFp32`: normalise in float32 with float32 weights, return the input's dtype.

    On the CPU, torch's layer_norm kernel takes a bf16/fp16 input with float32 weights and computes in float32
    itself: the same arithmetic without the two copies, 3x as fast as casting (a (16, 50, 768) bf16 input, Xeon with
    AMX); its outputs differ from the cast route's by at most one bf16 step, on ~3e-5 of them (another summation
    order). Elsewhere the input is cast, as OpenCLIP does.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return super().forward(x.float()).to(x.dtype)


_fp32_classes: dict[type, type] = {nn.LayerNorm: LayerNormFp32}


def _fp32_class(cls: type) -> type:
    """A subclass of the norm class `cls` whose forward runs in float32 and returns the input's dtype."""
    if cls not in _fp32_classes:

        def forward(self, x: Tensor) -> Tensor:
            return cls.forward(self, x.float()).to(x.dtype)

        _fp32_classes[cls] = type(f"{cls.__name__}Fp32", (cls,), {"forward": forward, "__module__": __name__})
    return _fp32_classes[cls]


def is_fp32_norm(module: nn.Module) -> bool:
    """Whether `module` is a normalisation layer that runs in float32 after `apply_precision(..., "bf16"/"fp16")`."""
    return type(module) in _fp32_classes.values()


def check_precision(precision: str) -> None:
    """Raises ValueError, listing the choices, for a name `apply_precision` does not take."""
    if precision not in NAMES:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(NAMES)}")


# "auto" keeps a CLIP in fp32 when the low precision's embeddings of the probe batch fall below this cosine to fp32's
AUTO_MIN_COSINE = 0.999


class PrecisionWarning(UserWarning):
    """`precision="auto"` kept a model in fp32: the low precision changed its embeddings too much."""


def apply_precision(model: nn.Module, precision: str, device_type: str | None = None) -> str:
    """Cast a built model for inference, in place and once, and return the concrete precision (one of `PRECISIONS`),
    also recorded as `model.precision`. See the module docstring for what each name means.

    Args:
        model: a `clipworks.CLIP` (or one of its towers), float32 as built.
        precision: one of `NAMES`: a concrete precision, "auto", or OpenCLIP's "amp" names (float32).
        device_type: "cpu" or "cuda", for "auto" and "int8"; default: where the model's parameters are.

    Raises:
        ValueError: an unknown name, "int8" off the CPU, or a model cast before to another precision.
    """
    check_precision(precision)
    if device_type is None:
        device_type = next((p.device.type for p in model.parameters()), "cpu")
    if precision == "auto":
        if getattr(model, "precision", "fp32") != "fp32":
            return model.precision  # cast before: auto takes what is there
        precision = resolve_precision("auto", device_type, model)
        if precision in LOW_DTYPES:
            return _checked_cast(model, precision)
    precision = "fp32" if precision in AMP else precision
    done = getattr(model, "precision", "fp32")
    if done == precision:
        model.precision = precision
        return precision
    if done != "fp32":
        raise ValueError(f"this model was cast to {done} already; build a new one for {precision}")
    if precision == "int8":
        if device_type != "cpu":
            raise ValueError(f"precision int8 runs on the CPU only (int8 matrix products); this model is on "
                             f"{device_type}: use bf16 there")  # fmt: skip
        from .quant import quantize_int8

        quantize_int8(model)
    elif precision != "fp32":
        dtype = LOW_DTYPES[precision]
        model.to(dtype)
        if not precision.startswith("pure_"):
            _keep_fp32(model)
    model.precision = precision
    return precision


def _checked_cast(model: nn.Module, precision: str) -> str:
    """Cast a CLIP to `precision` if its normalised embeddings of a fixed probe batch (`_probe_batch`) stay within
    `AUTO_MIN_COSINE` of the fp32 ones; else put its fp32 weights back (the very tensors: nothing is rounded) and
    keep fp32, saying why in `model.precision_note` and a `PrecisionWarning`. While checking, the model's fp32 and
    low-precision weights are both held (1.5x its fp32 size)."""
    batch = _probe_batch(model)
    try:
        want = None if batch is None else _probe(model, batch)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:  # a tower the generic probe does not fit
        batch, why = None, f"the probe batch does not fit this model ({type(e).__name__}: {e})"
    else:
        why = "not a CLIP with both towers"
    if batch is None:  # nothing to compare on: cast as asked, and say it was not checked
        done = apply_precision(model, precision)
        model.precision_note = f"{done}: not checked ({why})"
        return done
    # the fp32 tensors themselves, not copies: every parameter's data and every buffer (persistent or not)
    params = [(p, p.data) for p in model.parameters()]
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    classes = [(m, type(m)) for m in model.modules()]
    apply_precision(model, precision)
    got = _probe(model, batch)
    worst = min(F.cosine_similarity(g.float(), w.float(), dim=-1).min().item() for g, w in zip(got, want))
    if worst >= AUTO_MIN_COSINE:
        model.precision_note = f"{precision}: probe cosine to fp32 {worst:.5f}"
        return precision
    for module, cls in classes:
        module.__class__ = cls
    for param, data in params:
        param.data = data
    for module, name, buffer in buffers:
        module._buffers[name] = buffer
    model.precision = "fp32"
    model.precision_note = (f"kept fp32: {precision} embeddings fell to cosine {worst:.5f} to fp32's on a probe "
                            f"batch (auto needs >= {AUTO_MIN_COSINE})")  # fmt: skip
    warnings.warn(f"precision auto: {model.precision_note}", PrecisionWarning, stacklevel=3)
    return "fp32"


def _probe_batch(model: nn.Module) -> tuple[Tensor, Tensor] | None:
    """Four images (smooth colour ramps with noise, in the normalised pixel range) and four token sequences (random
    ids of several lengths, each closed by the end token) for a CLIP with both towers; None for anything else."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "vision", None) is None or getattr(cfg, "text", None) is None or not hasattr(model, "encode_text"):
        return None
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    S, t = cfg.vision.image_size, cfg.text
    rows, cols = torch.linspace(-1.5, 1.5, S)[:, None].expand(S, S), torch.linspace(-1.5, 1.5, S)[None, :].expand(S, S)
    images = torch.stack([torch.stack([rows * c, cols, (rows - cols) / 2]) for c in (1.0, 0.5, -0.5, -1.0)])
    images = images + 0.5 * torch.randn(images.shape, generator=g)
    L = t.context_length
    tokens = torch.full((4, L), t.pad_id, dtype=torch.long)
    for row, length in enumerate((3, 8, L // 2, L - 1)):
        tokens[row, :length] = torch.randint(3, min(t.vocab_size, 30000), (length,), generator=g)
        tokens[row, length] = getattr(t, "eos_id", 2)  # a Hugging Face tokenizer's end token: any id but padding
    return images.to(device), tokens.to(device)


def _probe(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    images, tokens = batch
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
    finally:
        model.train(training)


def _keep_fp32(model: nn.Module) -> None:
    """Put back in float32 what "bf16"/"fp16" keeps there: the norms (computing in float32) and the logit scale/bias."""
    for module in model.modules():
        if isinstance(module, _NORMS + _BATCH_NORMS):
            module.float()
            if isinstance(module, _NORMS) and not is_fp32_norm(module):
                module.__class__ = _fp32_class(type(module))
    for name in ("logit_scale", "logit_bias"):
        p = getattr(model, name, None)
        if isinstance(p, nn.Parameter):
            p.data = p.data.float()


def model_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a tower's matrix products run in: that of its first weight with two or more dimensions (a linear or
    convolution layer, or a projection), float32 for a module without one (e.g. quantised to int8)."""
    return next((p.dtype for p in module.parameters() if p.ndim > 1), torch.float32)
