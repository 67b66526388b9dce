"""Fast bf16/fp16 inference on the CPU: the transformer blocks' linear layers as oneDNN products on prepacked
weights, with their bias, the MLP's GELU and the residual adds computed inside the product (issue 22).

A bf16 ViT-B-32 on an AMX CPU spends much of its time outside the matrix products: `F.linear` with a bias in
bf16 first copies the broadcast bias into the output (a slow strided copy, ~20% of each product), the GELU and the
residual adds each read and write the whole activation once more, and the weights are re-laid-out for the AMX
tiles on every call. `prepack_linears` does what `torch.compile(..., options={"freezing": True})` does for these
layers, eagerly and without a compile step: the weights are reordered once into oneDNN's blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, the op inductor's freezing pass uses), and each product runs as
`torch.ops.mkldnn._linear_pointwise` with the bias, the activation ("gelu": erf or tanh; "relu") or the residual add
as the product's post-op, applied to the output tile while it is still in cache.

For inference only, on bf16/fp16 weights only (a float32 model keeps its bit-exact path; cast it first with
`apply_precision`): the packed layers hold buffers in an opaque layout, not parameters, and have no gradient.
`compile_for_inference` is the other route: inductor with freezing compiles the whole tower (the layer norms and
adds fused too), at a one-off compile cost of tens of seconds per tower and input shape.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .layers import Block
from .vit import VisionTransformer

__all__ = ["PackedLinear", "PackedPatchEmbed", "compile_for_inference", "packed_linears_available", "prepack_linears"]

_LOW = (torch.bfloat16, torch.float16)
# our activation classes to oneDNN post-ops: (attr, algorithm); QuickGELU has none (oneDNN's swish has alpha 1)
_POST_OPS = {"GELU:none": ("gelu", "none"), "GELU:tanh": ("gelu", "tanh"), "ReLU": ("relu", "")}


def _post_op(act: nn.Module) -> tuple[str, str] | None:
    if isinstance(act, nn.GELU):
        return _POST_OPS[f"GELU:{act.approximate}"]
    if isinstance(act, nn.ReLU):
        return _POST_OPS["ReLU"]
    return None


class PackedLinear(nn.Module):
    """A bf16/fp16 `nn.Linear` (optionally followed by its activation) as one oneDNN product on a prepacked weight.

    `forward_add(x, residual)` returns `residual + self(x)` with the add done in the product's epilogue.
    """

    def __init__(self, linear: nn.Linear, post_op: tuple[str, str] | None = None):
        super().__init__()
        weight = linear.weight.detach()
        if weight.dtype not in _LOW or weight.device.type != "cpu":
            raise ValueError(f"PackedLinear takes a bf16/fp16 linear layer on the CPU; got {weight.dtype} on "
                             f"{weight.device.type}")  # fmt: skip
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = weight.dtype
        self.register_buffer("weight_packed", torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None))
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(self.dtype).contiguous())
        self.attr, self.algorithm = post_op or ("none", "")

    def _rows(self, x: Tensor) -> Tensor:
        return x.to(self.dtype).reshape(-1, self.in_features)  # (rows, in)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.ops.mkldnn._linear_pointwise(self._rows(x), self.weight_packed, self.bias, self.attr, [],
                                                 self.algorithm)  # fmt: skip
        return out.view(*x.shape[:-1], self.out_features)

    def forward_add(self, x: Tensor, residual: Tensor) -> Tensor:
        """`residual + self(x)`, the add fused into the product (no activation: the layer must have none)."""
        assert self.attr == "none", "a residual add follows a product without activation"
        other = residual.to(self.dtype).reshape(-1, self.out_features)
        out = torch.ops.mkldnn._linear_pointwise.binary(self._rows(x), other, self.weight_packed, self.bias, "add")
        return out.view(residual.shape)

    def forward_rows(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Outputs `start:stop` of `self(x)` (a packed weight cannot be sliced: all are computed, then cut)."""
        return self(x)[..., start:stop]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, " \
               f"post_op={self.attr}"  # fmt: skip


class PackedPatchEmbed(nn.Module):
    """A ViT's patch embedding (a bf16/fp16 `nn.Conv2d` whose kernel is its stride) as one packed matrix product.

    A stride-p p x p convolution is a product of the (B h w, 3 p p) patch rows with the (3 p p, D) weight. oneDNN's
    bf16 convolution runs it at about a third of its matrix-product rate; here the pixels are cast and laid out as
    patch rows in one copy, then multiplied on the prepacked weight (ViT-B-32, batch 32, AMX: 11.3 ms -> 4.5 ms,
    cast included). It takes pixels in any float dtype and returns what the convolution does: (B, D, h, w), pixels
    past the last whole patch unseen.
    """

    takes_any_dtype = True  # `VisionTransformer.embed` hands it the pixels as they come

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not packable_patch_embed(conv):
            raise ValueError(f"PackedPatchEmbed takes a bf16/fp16 Conv2d on the CPU with kernel == stride, no "
                             f"padding, dilation or groups; got {conv}, {conv.weight.dtype}")  # fmt: skip
        weight = conv.weight.detach()
        self.out_channels, self.in_channels, self.patch = weight.shape[0], weight.shape[1], conv.stride[0]
        self.dtype = weight.dtype
        rows = nn.Linear(weight[0].numel(), self.out_channels, bias=conv.bias is not None, dtype=self.dtype)
        rows.weight.data = weight.reshape(self.out_channels, -1)  # (D, C p p): (c, i, j) order, as the patch rows
        if conv.bias is not None:
            rows.bias.data = conv.bias.detach()
        self.rows = PackedLinear(rows)

    def forward(self, images: Tensor) -> Tensor:
        B, C, H, W = images.shape
        p = self.patch
        h, w = H // p, W // p
        patches = images[:, :, : h * p, : w * p].reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5)
        rows = torch.empty((B, h, w, C, p, p), dtype=self.dtype, device=images.device).copy_(patches)  # cast + lay out
        out = self.rows(rows.view(B, h, w, C * p * p))  # (B, h, w, D)
        return out.permute(0, 3, 1, 2)  # (B, D, h, w), channels-last in memory

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, patch={self.patch}, dtype={self.dtype}"


def packable_patch_embed(conv: nn.Module) -> bool:
    """Whether `conv` is a patch embedding `PackedPatchEmbed` can take (see there)."""
    return (type(conv) is nn.Conv2d and conv.weight.dtype in _LOW and conv.weight.device.type == "cpu"
            and conv.kernel_size == conv.stride and conv.kernel_size[0] == conv.kernel_size[1]
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1)  # fmt: skip


def prepack_linears(model: nn.Module) -> int:
    """Replace, in place, the four linear layers of every transformer block (`layers.Block`) of `model` whose weights
    are bf16 or fp16 by `PackedLinear`s, fusing the MLP's activation where oneDNN has it (GELU, ReLU; not QuickGELU),
    and a clipworks ViT's bf16/fp16 patch embedding by a `PackedPatchEmbed`, and return how many layers were
    replaced. The model becomes inference-only (its parameters stop requiring gradients).

    Raises:
        ValueError: the model is not on the CPU, this torch has no oneDNN linear ops, or no block has bf16/fp16
            linear weights (cast first: `apply_precision(model, "bf16")`).
    """
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"prepack_linears is for the CPU; the model is on {sorted(devices)}")
    if not packed_linears_available():
        raise ValueError(f"this torch build ({torch.__version__}) has no oneDNN linear ops (torch.ops.mkldnn)")
    done = 0
    for block in (m for m in model.modules() if type(m) is Block):
        attn, mlp = block.attn, block.mlp
        if not isinstance(attn.qkv, nn.Linear) or attn.qkv.weight.dtype not in _LOW:
            continue
        block.ln_1, attn.qkv = _fold_norm(block.ln_1, attn.qkv)
        block.ln_2, mlp.fc1 = _fold_norm(block.ln_2, mlp.fc1)
        post_op = _post_op(mlp.act)
        attn.qkv, attn.out = PackedLinear(attn.qkv), PackedLinear(attn.out)
        mlp.fc1, mlp.fc2 = PackedLinear(mlp.fc1, post_op), PackedLinear(mlp.fc2)
        if post_op is not None:
            mlp.act = nn.Identity()  # now inside fc1
        done += 4
    for tower in (m for m in model.modules() if isinstance(m, VisionTransformer)):
        if packable_patch_embed(tower.patch_embed):
            tower.patch_embed = PackedPatchEmbed(tower.patch_embed)
            done += 1
    if not done:
        raise ValueError(f"{type(model).__name__} has no transformer block with bf16/fp16 linear layers to pack; "
                         "cast it first (apply_precision(model, 'bf16'))")  # fmt: skip
    model.requires_grad_(False)
    return done


def _fold_norm(norm: nn.Module, linear: nn.Linear) -> tuple[nn.Module, nn.Linear]:
    """A LayerNorm's affine folded into the linear layer it feeds: W (n * g + b) + c = (W diag g) n + (W b + c), in
    float32, rounded once to the linear's dtype. The norm left is a plain one without affine, in the low dtype:
    torch's bf16/fp16 LayerNorm kernel computes its mean and variance in float32 and rounds its output once, as
    `LayerNormFp32` does, but is ~10x faster on the CPU than casting to float32 and back (measured on (1600, 768))."""
    if type(norm) is nn.LayerNorm or not isinstance(norm, nn.LayerNorm) or norm.weight is None:
        return norm, linear  # already low-precision (pure_bf16), or another norm: left as it is
    dtype = linear.weight.dtype
    g, b = norm.weight.detach().float(), norm.bias.detach().float() if norm.bias is not None else None
    w = linear.weight.detach().float()  # (out, in)
    bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(w.shape[0])
    folded = nn.Linear(linear.in_features, linear.out_features, dtype=dtype)
    folded.weight.data = (w * g).to(dtype)
    folded.bias.data = (bias + (w @ b if b is not None else 0)).to(dtype)
    plain = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)
    return plain, folded


@functools.cache
def packed_linears_available() -> bool:
    """Whether torch's oneDNN linear ops run here in bf16 and agree with `F.linear` (on a small probe)."""
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, generator=g).bfloat16()
    layer = nn.Linear(32, 48).bfloat16()
    try:
        got = PackedLinear(layer)(x)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return torch.allclose(got.float(), layer(x).float(), atol=0.05, rtol=0.02)


def compile_for_inference(model: nn.Module, dynamic: bool | None = None) -> nn.Module:
    """Compile, in place, the towers of a clipworks `CLIP` (or a single tower) with torch.compile and inductor's
    freezing (weights folded as constants and prepacked for oneDNN, layer norms and residual adds fused), and return
    the model. Compilation happens at the first call of each tower with a new input shape (tens of seconds on a
    small CPU); text lengths vary, so the text tower is compiled with dynamic shapes after its first recompile
    (`dynamic=None`, torch's default). Inference only: call under `torch.inference_mode()` or `torch.no_grad()`
    (freezing applies only there). Works in any precision; on a bf16 model it is the fastest CPU route measured.
    """
    towers = [getattr(model, name) for name in ("visual", "text") if isinstance(getattr(model, name, None), nn.Module)]
    for tower in towers or [model]:
        tower.compile(dynamic=dynamic, options={"freezing": True})
    model.requires_grad_(False)
    return model

