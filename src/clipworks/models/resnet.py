"""OpenAI's modified ResNet image tower: 3-conv stem, anti-aliased bottlenecks, attention pool."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from clipworks.config import ResNetConfig
from clipworks.models.keymap import KeyMap, Rule

EXPANSION = 4  # a bottleneck's output has 4x its inner channels


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck; a stride is an average pool, not a strided conv (anti-aliasing)."""

    FOLD_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))  # each BN right after its conv (fold.py)

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out_channels = channels * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride > 1 or in_channels != out_channels:
            self.downsample = Downsample(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        # In-place ReLU and sum on tensors made here (never on x): one pass over the activations fewer each.
        out = self.bn1(self.conv1(x)).relu_()
        out = self.bn2(self.conv2(out)).relu_()
        out = self.bn3(self.conv3(self.pool(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out.add_(shortcut).relu_()


class Downsample(nn.Module):
    """The shortcut of a strided or widening bottleneck: average pool, then 1x1 conv + BN."""

    FOLD_PAIRS = (("conv", "bn"),)

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(self.pool(x)))


class Stem(nn.Module):
    """Three 3x3 convs (the first strided) and a 2x2 average pool in place of a max pool: stride 4."""

    FOLD_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x)).relu_()
        x = self.bn2(self.conv2(x)).relu_()
        x = self.bn3(self.conv3(x)).relu_()
        return F.avg_pool2d(x, 2)


class AttentionPool2d(nn.Module):
    """Multi-head attention of the mean feature (as the query) over all positions and itself."""

    def __init__(self, tokens: int, width: int, heads: int, out_dim: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention-pool width {width} is not divisible by heads={heads}")
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.empty(tokens + 1, width))
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2).transpose(1, 2)  # (B, N, D); no copy when x is channels-last
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, N+1, D)
        x = x + self.positional_embedding.to(x.dtype)
        # Only the mean token's output is kept, so there is one query per head, and the key and value projections
        # can act on it instead of on all N+1 tokens: q.(Wk x + bk) = (Wk^T q).x + q.bk, whose last term is the
        # same for every token and cancels in the softmax; sum_n p_n (Wv x_n + bv) = Wv (sum_n p_n x_n) + bv, as
        # the p_n sum to 1. Multi-head attention exactly, in ~2 D^2 + 2 N D H products per image instead of
        # 2 N D^2 (RN50: 20x fewer; the projections were 7% of the tower's time).
        heads, (width, d) = self.heads, self.k_proj.weight.shape
        q = self.q_proj(x[:, 0]).unflatten(-1, (heads, -1)) * (width // heads) ** -0.5  # (B, H, D/H)
        # q.bk is kept although it cancels, so that bk gets its (zero) gradient, as DDP expects of every parameter
        qb = (q * self.k_proj.bias.view(heads, -1)).sum(-1, keepdim=True)  # (B, H, 1)
        q = torch.einsum("bhc,hcd->bhd", q, self.k_proj.weight.view(heads, -1, d))  # (B, H, D): Wk_h^T q_h
        scores = torch.baddbmm(qb, q, x.transpose(1, 2))  # (B, H, N+1)
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)  # in fp32 in a bf16 tower too, as SDPA
        v = torch.einsum("bhd,hcd->bhc", p @ x, self.v_proj.weight.view(heads, -1, d))  # (B, H, D/H)
        v = v + self.v_proj.bias.view(heads, -1)
        return self.out_proj(v.flatten(1))  # (B, E)


class ModifiedResNet(nn.Module):
    """OpenAI CLIP's ResNet (Radford et al. 2021, sec. 2.4): stem, four bottleneck stages, attention pool.

    Args:
        cfg: the tower's architecture.
        embed_dim: output size E.
    """

    def __init__(self, cfg: ResNetConfig, embed_dim: int):
        super().__init__()
        if cfg.image_size % 32:
            raise ValueError(f"ResNet image_size must be a multiple of 32 (the tower's stride), got {cfg.image_size}")
        self.image_size = cfg.image_size  # an int, as OpenCLIP's ModifiedResNet says it
        if len(cfg.layers) != 4 or min(cfg.layers) < 1:
            raise ValueError(f"ResNet layers must be 4 positive stage depths, got {cfg.layers}")
        self.cfg = cfg
        self.embed_dim = embed_dim
        self.grad_checkpointing = False
        self.stem = Stem(cfg.width)
        self.stages = nn.ModuleList()
        in_channels = cfg.width
        for i, depth in enumerate(cfg.layers):
            channels = cfg.width * 2**i
            stride = 1 if i == 0 else 2  # the stem has stride 4, each later stage halves again: 32 in all
            blocks = [Bottleneck(in_channels, channels, stride)]
            blocks += [Bottleneck(channels * EXPANSION, channels) for _ in range(depth - 1)]
            self.stages.append(nn.Sequential(*blocks))
            in_channels = channels * EXPANSION
        self.attn_pool = AttentionPool2d((cfg.image_size // 32) ** 2, in_channels, cfg.heads, embed_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """PyTorch's default conv init; OpenAI's N(0, 1/D) attention pool; zero gain on each block's last BN."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
                m.reset_parameters()
        pool = self.attn_pool
        std = pool.out_proj.in_features**-0.5
        nn.init.normal_(pool.positional_embedding, std=std)
        for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.out_proj):
            nn.init.normal_(proj.weight, std=std)
        # Each residual branch starts at zero, so every block starts as (ReLU of) its shortcut (Goyal et al. 2017).
        for block in self._blocks():
            nn.init.zeros_(block.bn3.weight)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each bottleneck's activations in the backward pass (training only)."""
        self.grad_checkpointing = enable

    def forward(self, images: Tensor) -> Tensor:
        """Map (B, 3, H, W) images to (B, E) unnormalised features."""
        x = self.stem(images.to(self.stem.conv1.weight.dtype))  # float32 pixels into a bf16/fp16 tower
        for block in self._blocks():
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False, context_fn=_frozen_bn_on_recompute(block))
            else:
                x = block(x)
        return self.attn_pool(x)

    def _blocks(self) -> Iterator[Bottleneck]:
        for stage in self.stages:
            yield from stage


def _frozen_bn_on_recompute(module: nn.Module):
    """A checkpoint `context_fn` under which recomputing `module` leaves its BatchNorm statistics alone.

    The recomputation sees the same batch, so the output is unchanged, but in training BatchNorm would
    update its running statistics a second time.
    """

    @contextlib.contextmanager
    def frozen():
        norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
        saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                 for m in norms]
        for m in norms:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
        try:
            yield
        finally:
            for m, (momentum, count) in zip(norms, saved):
                m.momentum = momentum
                if count is not None:
                    m.num_batches_tracked.copy_(count)

    return lambda: (contextlib.nullcontext(), frozen())


_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _conv_bn(ours_conv: str, ours_bn: str, theirs_conv: str, theirs_bn: str) -> list[Rule]:
    return [Rule(f"{ours_conv}.weight", f"{theirs_conv}.weight")] + [
        Rule(f"{ours_bn}.{k}", f"{theirs_bn}.{k}") for k in _BN_KEYS
    ]


def _key_map() -> KeyMap:
    """Ours <-> OpenAI's names, which OpenCLIP keeps: `layer1..4` (1-based), `downsample.0/1`, `c_proj`."""
    rules = []
    for n in (1, 2, 3):
        rules += _conv_bn(f"stem.conv{n}", f"stem.bn{n}", f"conv{n}", f"bn{n}")
    for s in range(4):
        ours, theirs = f"stages.{s}.{{i}}", f"layer{s + 1}.{{i}}"
        for n in (1, 2, 3):
            rules += _conv_bn(f"{ours}.conv{n}", f"{ours}.bn{n}", f"{theirs}.conv{n}", f"{theirs}.bn{n}")
        rules += _conv_bn(f"{ours}.downsample.conv", f"{ours}.downsample.bn", f"{theirs}.downsample.0",
                          f"{theirs}.downsample.1")
    rules.append(Rule("attn_pool.positional_embedding", "attnpool.positional_embedding"))
    for ours, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("out_proj", "c_proj")):
        rules += [Rule(f"attn_pool.{ours}.{k}", f"attnpool.{theirs}.{k}") for k in ("weight", "bias")]
    return KeyMap(rules)


_KEY_MAP = _key_map()


def convert_from_open_clip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an OpenCLIP / OpenAI ResNet `visual.` state dict (prefix removed) to this tower's keys.

    Raises:
        ValueError: keys that no rule converts, named.
    """
    return _KEY_MAP.to_ours(sd)


def convert_to_open_clip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename this tower's state dict to OpenCLIP / OpenAI ResNet `visual.` keys (prefix removed)."""
    return _KEY_MAP.to_theirs(sd)
