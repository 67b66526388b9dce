"""Transformer building blocks shared by the ViT and text towers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": nn.GELU,
    "quick_gelu": QuickGELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,  # M2M100 / NLLB
}


def build_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _outputs(layer: nn.Module, x: Tensor, start: int, stop: int) -> Tensor:
    """Outputs `start:stop` of the linear `layer(x)`, without computing the others (an `nn.Linear`, or a
    layer with `forward_rows`, such as `quant.Int8Linear`)."""
    if isinstance(layer, nn.Linear):
        bias = None if layer.bias is None else layer.bias[start:stop]
        return F.linear(x, layer.weight[start:stop], bias)
    return layer.forward_rows(x, start, stop)


def _project(layer: nn.Module, x: Tensor, residual: Tensor | None) -> Tensor:
    """`residual + layer(x)` (just `layer(x)` without a residual); a layer with `forward_add` (`fast.PackedLinear`)
    does the add inside its product. For an `nn.Linear` this is the plain add, so float32 results are unchanged."""
    if residual is None:
        return layer(x)
    forward_add = getattr(layer, "forward_add", None)
    return residual + layer(x) if forward_add is None else forward_add(x, residual)


class Attention(nn.Module):
    """Multi-head self-attention with one packed qkv projection, computed by scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(
        self, x: Tensor, causal: bool = False, attn_mask: Tensor | None = None, residual: Tensor | None = None
    ) -> Tensor:
        """Self-attention of `x` (B, L, D); with `residual`, `residual + attention` (fused where the layer can)."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, Dh)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)  # (B, H, L, Dh)
        return _project(self.out, x.transpose(1, 2).reshape(B, L, D), residual)

    def forward_one(self, x: Tensor, index: Tensor, causal: bool = False, attn_mask: Tensor | None = None) -> Tensor:
        """The attention output at one position per sequence, `index` (B,): (B, 1, D).

        Keys and values are needed at every position, the query only at `index`: a third of the qkv
        projection and all but one row of the output projection are skipped. `attn_mask`, if given, is a boolean
        (B, 1, L, L) mask of the whole sequence (True where a query may attend); its rows at `index` are used.
        """
        B, L, D = x.shape
        Dh = D // self.heads
        rows = torch.arange(B, device=x.device)
        q = _outputs(self.qkv, x[rows, index][:, None], 0, D).view(B, 1, self.heads, Dh).transpose(1, 2)  # (B, H, 1, Dh)
        k, v = _outputs(self.qkv, x, D, 3 * D).view(B, L, 2, self.heads, Dh).permute(2, 0, 3, 1, 4)  # 2 x (B, H, L, Dh)
        mask = None if attn_mask is None else attn_mask[rows, :, index][:, :, None]  # (B, 1, 1, L)
        if causal:  # the query at position p sees keys 0..p
            seen = (torch.arange(L, device=x.device)[None, :] <= index[:, None])[:, None, None, :]  # (B, 1, 1, L)
            mask = seen if mask is None else mask & seen
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, 1, Dh)
        return self.out(x.transpose(1, 2).reshape(B, 1, D))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = build_activation(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return _project(self.fc2, self.act(self.fc1(x)), residual)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    int8_linears = ("attn.qkv", "attn.out", "mlp.fc1", "mlp.fc2")  # what `quant.quantize_int8` replaces

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str, norm_eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, int(width * mlp_ratio), act)

    def forward(self, x: Tensor, causal: bool = False, attn_mask: Tensor | None = None) -> Tensor:
        x = self.attn(self.ln_1(x), causal=causal, attn_mask=attn_mask, residual=x)  # x + attn(ln_1(x))
        return self.mlp(self.ln_2(x), residual=x)

    def forward_one(self, x: Tensor, index: Tensor, causal: bool = False, attn_mask: Tensor | None = None) -> Tensor:
        """The block's output at position `index` (B,) of each sequence only: (B, D)."""
        rows = torch.arange(x.shape[0], device=x.device)
        y = x[rows, index][:, None] + self.attn.forward_one(self.ln_1(x), index, causal, attn_mask)  # (B, 1, D)
        return self.mlp(self.ln_2(y), residual=y)[:, 0]


class Transformer(nn.Module):
    """A stack of pre-norm blocks, with optional gradient checkpointing per block."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act: str, norm_eps: float):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, act, norm_eps) for _ in range(layers))
        self.grad_checkpointing = False

    def _run(self, block: Block, x: Tensor, causal: bool, attn_mask: Tensor | None) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, causal, attn_mask, use_reentrant=False)
        return block(x, causal, attn_mask)

    def forward(self, x: Tensor, causal: bool = False, attn_mask: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = self._run(block, x, causal, attn_mask)
        return x

    def forward_one(self, x: Tensor, index: Tensor, causal: bool = False, attn_mask: Tensor | None = None) -> Tensor:
        """The last block's output at position `index` (B,) of each sequence, (B, D): what a model that pools
        one token needs. The earlier blocks run in full; the last one only where its output is used. `attn_mask`:
        a boolean (B, 1, L, L) mask, True where a query may attend."""
        for block in self.blocks[:-1]:
            x = self._run(block, x, causal, attn_mask)
        last = self.blocks[-1]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(last.forward_one, x, index, causal, attn_mask, use_reentrant=False)
        return last.forward_one(x, index, causal, attn_mask)

    def forward_hidden(
        self, x: Tensor, causal: bool = False, attn_mask: Tensor | None = None, stop_at: int | None = None
    ) -> list[Tensor]:
        """Every hidden state: the input, then each block's output (layers + 1 tensors, as transformers does).

        Args:
            stop_at: stop after this many blocks (blocks past it are not run): CLIP skip does not pay for
                layers it throws away.
        """
        hidden = [x]
        for block in self.blocks[:stop_at]:
            x = self._run(block, x, causal, attn_mask)
            hidden.append(x)
        return hidden

    def init_weights(self) -> None:
        init_blocks(self.blocks, self.width, len(self.blocks))


def init_blocks(blocks, width: int, depth: int) -> None:
    """OpenAI CLIP's init of blocks with `attn` and `mlp` (Block, CoCa's CrossBlock) in a stack `depth` deep:
    residual projections shrink with depth so the stream's variance stays bounded; biases zero."""
    attn_std = width**-0.5
    proj_std = attn_std * (2 * depth) ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in blocks:
        nn.init.normal_(block.attn.qkv.weight, std=attn_std)
        nn.init.zeros_(block.attn.qkv.bias)
        nn.init.normal_(block.attn.out.weight, std=proj_std)
        nn.init.zeros_(block.attn.out.bias)
        nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
        nn.init.zeros_(block.mlp.fc1.bias)
        nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
        nn.init.zeros_(block.mlp.fc2.bias)


# Key maps between OpenCLIP/OpenAI transformer blocks and ours: (their suffix, our suffix).
OPEN_CLIP_BLOCK_KEYS = (
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.weight", "attn.out.weight"),
    ("attn.out_proj.bias", "attn.out.bias"),
    ("mlp.c_fc.weight", "mlp.fc1.weight"),
    ("mlp.c_fc.bias", "mlp.fc1.bias"),
    ("mlp.c_proj.weight", "mlp.fc2.weight"),
    ("mlp.c_proj.bias", "mlp.fc2.bias"),
    ("ln_1.weight", "ln_1.weight"),
    ("ln_1.bias", "ln_1.bias"),
    ("ln_2.weight", "ln_2.weight"),
    ("ln_2.bias", "ln_2.bias"),
)
# timm's ViT blocks (SigLIP image tower).
TIMM_BLOCK_KEYS = (
    ("attn.qkv.weight", "attn.qkv.weight"),
    ("attn.qkv.bias", "attn.qkv.bias"),
    ("attn.proj.weight", "attn.out.weight"),
    ("attn.proj.bias", "attn.out.bias"),
    ("mlp.fc1.weight", "mlp.fc1.weight"),
    ("mlp.fc1.bias", "mlp.fc1.bias"),
    ("mlp.fc2.weight", "mlp.fc2.weight"),
    ("mlp.fc2.bias", "mlp.fc2.bias"),
    ("norm1.weight", "ln_1.weight"),
    ("norm1.bias", "ln_1.bias"),
    ("norm2.weight", "ln_2.weight"),
    ("norm2.bias", "ln_2.bias"),
)
