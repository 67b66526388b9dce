"""Int8 inference on the CPU: the transformer blocks' linear layers as int8 matrix products.

A fp32 ViT on the CPU spends ~85% of its time in the linear layers' matrix products, which already run at
the core's fp32 peak. An int8 product does about three times the work per cycle where the CPU has int8 dot
products (AVX-512 VNNI / AVX-VNNI, through oneDNN): measured 3.0x on a 1600 x 768 x 3072 product, and
`quantize_int8` makes a ViT-B-32 encode images 1.7x as fast (2 cores, one thread each).

- Weights: int8 per output channel (symmetric: scale = max |w| / 127), quantised once.
- Activations: int8 per row, that is per token (scale = the row's max |x| / 127), quantised on every call.
- Products: `torch._int_mm` with int32 accumulation, then rescaled to float and the bias added.

The outputs are not the fp32 model's: the embeddings measured here are within cosine 0.9999 of the fp32 ones
(a random ViT-B-32; the trained demo model of `clipworks train`, whose held-out zero-shot accuracy moved from
56.4% to 56.8%), and models with large activation outliers can lose more. So this is an opt-in
(`--int8` on `clipworks embed`, `serve`, `eval` and `classify`), never a default.
Where the CPU has bf16 matrix units (AMX: Intel Sapphire Rapids and later), bf16 is the faster route, not this one
(issue 22, measured on one core of such a Xeon): `torch._int_mm` runs a 1600 x 768 x 3072 product at 0.4-0.6x the
bf16 product's rate (it does not reach the AMX int8 tiles), and quantising the activations per row costs about half
a bf16 product more. oneDNN's own int8 product (`torch.ops.onednn.qlinear_pointwise`, AMX-INT8) is 1.4x the bf16
one on that shape, but takes per-tensor quantised uint8 inputs: a win only with the quantisation fused into the
LayerNorm before it (inductor's int8 route), not as a drop-in layer. So `int8` is for CPUs with VNNI and no bf16
units (AVX-512 VNNI / AVX-VNNI: 1.7-2x fp32); on AMX use `apply_precision(model, "bf16")` and
`fast.prepack_linears`.
Only the blocks' attention (qkv, output) and MLP projections are quantised (nearly all of the FLOPs); embeddings,
norms, attention itself, pooling and the final projections stay fp32. For inference only: the quantised
layers hold buffers, not parameters, and have no gradient.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

__all__ = ["Int8Linear", "int8_products_available", "is_quantized", "quantize_int8"]

_TINY = 1e-12  # floor for scales: an all-zero row or weight channel quantises to zeros, not to NaN


def _quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row of a 2-D float tensor: (int8 values, float scales (rows, 1))."""
    low, high = torch.aminmax(x, dim=1, keepdim=True)  # one pass; cheaper than x.abs().amax()
    scale = torch.maximum(-low, high).clamp_min_(_TINY).div_(127)
    return torch.div(x, scale).round_().to(torch.int8), scale


class Int8Linear(nn.Module):
    """An `nn.Linear` with int8 weights and dynamically quantised int8 inputs (CPU only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = _quantize_rows(linear.weight.detach().float().cpu())
        self.register_buffer("weight_int8", weight)  # (out, in)
        self.register_buffer("weight_scale", scale[:, 0])  # (out,)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().cpu())

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_rows(x, 0, self.out_features)

    def forward_rows(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Outputs `start:stop` of `self(x)` only (the others are not computed)."""
        if x.device.type != "cpu":
            raise RuntimeError(f"Int8Linear runs on the CPU only; got an input on {x.device}")
        if x.requires_grad and torch.is_grad_enabled():  # rounding and _int_mm would cut the graph silently
            raise RuntimeError("Int8Linear is for inference: no gradient flows through it (use the fp32 model)")
        rows = x.reshape(-1, self.in_features)
        if not rows.shape[0]:
            return x.new_zeros(*x.shape[:-1], stop - start)
        values, scale = _quantize_rows(rows.float())
        out = torch._int_mm(values, self.weight_int8[start:stop].t()).float()  # int32 sums, exact
        out.mul_(scale).mul_(self.weight_scale[start:stop])
        if self.bias is not None:
            out.add_(self.bias[start:stop])
        return out.view(*x.shape[:-1], stop - start).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace, in place, the linear layers of every transformer block in `model` (both towers of a `CLIP`,
    or one tower) by `Int8Linear`s, and return `model`, now for inference only (its other parameters no
    longer require gradients). The model must be on the CPU.

    Raises:
        ValueError: the model is not on the CPU, or has no transformer blocks (a ResNet or ConvNeXt image
            tower alone).
    """
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"int8 inference runs on the CPU; the model is on {sorted(devices)}")
    if not int8_products_available():
        raise ValueError(f"this torch build ({torch.__version__}) has no CPU int8 matrix product (torch._int_mm)")
    # A transformer block names its quantisable linears (dotted paths) in `int8_linears`: layers.Block, and the
    # Hugging Face text families' blocks (models/hf_text.py).
    blocks = [m for m in model.modules() if getattr(m, "int8_linears", None)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to quantise")
    for block in blocks:
        for path in block.int8_linears:
            parent_path, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            layer = getattr(parent, name)
            if isinstance(layer, nn.Linear):
                setattr(parent, name, Int8Linear(layer))
    return model.requires_grad_(False)  # inference only: activations need no graph (Int8Linear refuses one)


@functools.cache
def int8_products_available() -> bool:
    """Whether `torch._int_mm` runs on the CPU here and gives exact int32 sums (on a probe with row slices,
    as `Int8Linear.forward_rows` takes them)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (19, 40), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (24, 40), generator=g, dtype=torch.int8)
    try:
        got = torch._int_mm(a, w[8:24].t())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return torch.equal(got, a.int() @ w[8:24].int().t())


def is_quantized(model) -> bool:
    """Whether `model` is a module holding any `Int8Linear` (was passed through `quantize_int8`)."""
    return isinstance(model, nn.Module) and any(isinstance(m, Int8Linear) for m in model.modules())
