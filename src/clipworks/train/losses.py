"""Contrastive losses for CLIP training: softmax (CLIP), sigmoid (SigLIP) and distillation from a teacher CLIP,
single- and multi-process.

Both losses take L2-normalised features and the *exponentiated* logit scale (what ``CLIPOutput.logit_scale``
holds) and agree in value and gradients with OpenCLIP's ``ClipLoss`` / ``SigLipLoss``.

Distributed convention. When ``torch.distributed`` is initialised with more than one process, each rank passes
its own slice of the global batch. Features are all-gathered so every rank sees the whole global batch
as negatives. With ``gather_with_grad=True`` the gather's backward sums the gradient that every rank's loss
sends to a slice back onto the rank that owns it, so a rank's feature gradient is ``world_size`` times the
gradient of the *mean over ranks* of the per-rank losses. DistributedDataParallel then averages parameter
gradients over ranks, which divides that factor out again: the parameter gradient equals the one a single
process would get from the loss on the whole global batch. ``logit_scale`` and ``logit_bias`` are not
gathered; their per-rank gradients are already those of the global loss (for the full-matrix CLIP loss) or of
the rank's share (local CLIP loss, SigLIP), and DDP's average gives the global gradient either way.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import rank_world

__all__ = [
    "CLIP_INIT_LOGIT_SCALE",
    "MAX_LOGIT_SCALE",
    "SIGLIP_INIT_LOGIT_BIAS",
    "SIGLIP_INIT_LOGIT_SCALE",
    "ClipLoss",
    "DistillClipLoss",
    "DistillLoss",
    "SigLipLoss",
    "build_loss",
    "clamp_logit_scale_",
    "init_logit_scale",
]

# CLIP (Radford et al. 2021, sec. 2.5) starts the learned temperature at 0.07 and clips the scale at 100 "to
# prevent scaling the logits by more than 100, which we found necessary to prevent training instability".
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)
# SigLIP (Zhai et al. 2023, sec. 3.2) starts at t' = log 10 and b = -10 so that the many negatives do not
# dominate the first steps: with a large negative bias the initial loss sits near the prior of ~1 positive in B.
SIGLIP_INIT_LOGIT_SCALE = math.log(10)
SIGLIP_INIT_LOGIT_BIAS = -10.0

_KINDS = ("clip", "siglip")


def init_logit_scale(kind: str) -> float:
    """The initial *log* logit scale for a loss kind.

    CLIP uses ln(1/0.07) and clamps it to ln(100) during training (see `clamp_logit_scale_`); SigLIP uses ln(10)
    with a logit bias of ``SIGLIP_INIT_LOGIT_BIAS`` (-10). ``CLIPConfig.init_logit_scale`` / ``init_logit_bias``
    carry these values into the model; this function is the loss-side record of them.

    Args:
        kind: "clip" or "siglip".
    """
    if kind == "clip":
        return CLIP_INIT_LOGIT_SCALE
    if kind == "siglip":
        return SIGLIP_INIT_LOGIT_SCALE
    raise ValueError(f"unknown loss kind {kind!r}; valid kinds: {', '.join(_KINDS)}")


@torch.no_grad()
def clamp_logit_scale_(model: nn.Module, max_log: float = MAX_LOGIT_SCALE) -> None:
    """Clamp ``model.logit_scale`` (the log scale) to [0, max_log] in place; call after each optimiser step.

    A DDP- or compile-wrapped model is unwrapped through ``.module`` / ``._orig_mod``.
    """
    while not hasattr(model, "logit_scale") and hasattr(model, "module"):
        model = model.module
    model = getattr(model, "_orig_mod", model)
    model.logit_scale.clamp_(0, max_log)


def _gather(x: Tensor, rank: int, world_size: int, *, with_grad: bool, keep_local_grad: bool) -> Tensor:
    """All-gather ``x`` (b, E) along the batch into (world_size * b, E).

    With ``with_grad`` the gather is autograd-aware (its backward sums gradients over ranks). Without it the
    gathered copies are constants; ``keep_local_grad`` puts this rank's own tensor back in its slot so that at
    least the local features get a gradient (OpenCLIP does this for the full-matrix loss).
    """
    if with_grad:
        return _AllGather.apply(x)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    if keep_local_grad:
        parts[rank] = x
    return torch.cat(parts, dim=0)


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums each slice's gradient over ranks and returns it to its owner.

    (``torch.distributed.nn.functional.all_gather`` does the same but is deprecated.)
    """

    @staticmethod
    def forward(ctx, x):
        world_size = dist.get_world_size()
        out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))  # (W * b, E)
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad):
        world_size, rank = dist.get_world_size(), dist.get_rank()
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            out = grad.new_empty((grad.shape[0] // world_size, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            return out
        # gloo has no reduce_scatter: reduce everything, keep this rank's slice.
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad.chunk(world_size, dim=0)[rank]


class _ChunkedPairReduce(torch.autograd.Function):
    """sum_i r(z_i.) over z = scale * q @ k.t() + bias, in row blocks, never holding all of z.

    ``reduce`` is "logsumexp" (softmax cross-entropy's normaliser, CLIP) or "softplus" (summed over the row,
    SigLIP's loss with every pair taken as a negative). The backward recomputes each block rather than saving
    it; d r / d z is softmax(z) for logsumexp and sigmoid(z) for softplus. All inputs share one dtype
    (callers upcast half precision with `_upcast`).
    """

    @staticmethod
    def forward(ctx, q, k, scale, bias, chunk_size, reduce):
        ctx.save_for_backward(q, k, scale, bias)
        ctx.chunk_size, ctx.reduce = chunk_size, reduce
        total = q.new_zeros(())
        for start in range(0, q.shape[0], chunk_size):
            z = scale * (q[start : start + chunk_size] @ k.t())  # (n, M)
            if bias is not None:
                z = z + bias
            total += torch.logsumexp(z, dim=1).sum() if reduce == "logsumexp" else F.softplus(z).sum()
        return total

    @staticmethod
    def backward(ctx, grad_out):
        q, k, scale, bias = ctx.saved_tensors
        dq, dk = torch.empty_like(q), torch.zeros_like(k)
        dscale, dbias = q.new_zeros(()), q.new_zeros(())
        for start in range(0, q.shape[0], ctx.chunk_size):
            qb = q[start : start + ctx.chunk_size]  # (n, E)
            sim = qb @ k.t()  # (n, M)
            z = scale * sim if bias is None else scale * sim + bias
            dz = torch.softmax(z, dim=1) if ctx.reduce == "logsumexp" else torch.sigmoid(z)
            dz = dz * grad_out  # (n, M)
            dq[start : start + ctx.chunk_size] = scale * (dz @ k)
            dk += scale * (dz.t() @ qb)
            dscale += (dz * sim).sum()
            dbias += dz.sum()
        dscale = dscale.reshape(scale.shape) if ctx.needs_input_grad[2] else None
        dbias = dbias.reshape(bias.shape) if bias is not None and ctx.needs_input_grad[3] else None
        return dq, dk, dscale, dbias, None, None


def _upcast(*tensors: Tensor) -> list[Tensor]:
    """Cast to one dtype of at least float32: the chunked sums run over the whole global batch."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [torch.as_tensor(t, device=tensors[0].device).to(dtype) for t in tensors]


def _pair_logits(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """Logits of the matching pairs z_i = scale * q_i . k_i (+ bias), (n,): no (n, M) matrix needed."""
    z = scale * (q * k).sum(dim=-1)
    return z if bias is None else z + bias


class _PairLoss(nn.Module):
    """What both losses take: where the negatives come from and how the logits are blocked."""

    def __init__(self, *, local_loss: bool = False, gather_with_grad: bool = True, chunk_size: int | None = None):
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.chunk_size = chunk_size


class ClipLoss(_PairLoss):
    """CLIP's symmetric softmax cross-entropy (Radford et al. 2021, fig. 3), matching OpenCLIP's ``ClipLoss``.

    Image i's positive is text i and every other text in the global batch is a negative, and vice versa;
    the loss is the mean of the image->text and text->image cross-entropies.

    Args:
        local_loss: across processes, compute only this rank's rows (local features against all gathered
            features, labels offset by rank * B) instead of the whole global logit matrix on every rank.
            The mean over ranks of the local losses equals the global loss.
        gather_with_grad: gather features with an autograd-aware all_gather so gradients reach the rank that
            owns each feature. Without it, gathered features are constants (OpenCLIP's default, which loses
            the gradient through other ranks' negatives).
        chunk_size: if set, process rows (and, for text->image, columns) in blocks of this many without ever
            holding the full (B_global, B_global) logits, in the forward or the backward. Same value and
            gradients up to rounding; computed in at least float32 (the loss is float32 for bf16 features).
    """

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor | None = None
    ) -> Tensor:
        """The scalar loss.

        Args:
            image_features: L2-normalised (B, E), this rank's slice of the batch.
            text_features: L2-normalised (B, E), paired row by row with ``image_features``.
            logit_scale: the exponentiated scale (a scalar tensor).
            logit_bias: optional scalar added to every logit. Softmax cross-entropy is invariant to it (its
                gradient is zero); it is accepted so models with a bias can train with this loss.
        """
        queries, offset = self._queries(image_features, text_features)
        if self.chunk_size is None:
            return self._dense(queries, offset, logit_scale, logit_bias)
        return self._chunked(queries, offset, logit_scale, logit_bias)

    def _queries(self, image_features: Tensor, text_features: Tensor):
        """((image queries, text keys), (text queries, image keys)) of the logit matrices this rank computes, and the
        column of its first positive."""
        rank, world_size = rank_world()
        if world_size > 1:
            opts = {"with_grad": self.gather_with_grad, "keep_local_grad": not self.local_loss}
            all_image = _gather(image_features, rank, world_size, **opts)
            all_text = _gather(text_features, rank, world_size, **opts)
        else:
            all_image, all_text = image_features, text_features
        if world_size > 1 and self.local_loss:
            # This rank's rows of both logit matrices: (B, B_global) each; the positives sit at column rank * B + i.
            return ((image_features, all_text), (text_features, all_image)), rank * image_features.shape[0]
        # The full (B_global, B_global) matrix; logits_per_text is its transpose.
        return ((all_image, all_text), (all_text, all_image)), 0

    @staticmethod
    def _dense(queries, offset: int, logit_scale: Tensor, logit_bias: Tensor | None) -> Tensor:
        losses = []
        for q, k in queries:
            logits = logit_scale * q @ k.t()  # (n, M)
            if logit_bias is not None:
                logits = logits + logit_bias
            labels = torch.arange(q.shape[0], device=q.device) + offset
            losses.append(F.cross_entropy(logits, labels))
        return (losses[0] + losses[1]) / 2

    def _chunked(self, queries, offset: int, logit_scale: Tensor, logit_bias: Tensor | None) -> Tensor:
        losses = []
        for q, k in queries:
            q, k, scale = _upcast(q, k, logit_scale)
            # cross_entropy(z_i, y_i) = logsumexp_j z_ij - z_{i, y_i}; the bias cancels between the two terms,
            # so it is left out of the blocks (and of the positive pairs).
            lse = _ChunkedPairReduce.apply(q, k, scale, None, self.chunk_size, "logsumexp")
            pos = _pair_logits(q, k[offset : offset + q.shape[0]], scale, None).sum()
            losses.append((lse - pos) / q.shape[0])
        loss = (losses[0] + losses[1]) / 2
        if logit_bias is not None:
            loss = loss + 0.0 * logit_bias  # keep the bias in the graph so DDP sees it used (its gradient is 0)
        return loss


class SigLipLoss(_PairLoss):
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, algorithm 1), matching OpenCLIP's ``SigLipLoss``.

    loss = -1/B * sum_{i, j} log sigmoid(y_ij * (scale * I_i . T_j + bias)), with y_ij = +1 for a matching pair
    and -1 otherwise, summed over all texts j of the global batch and the B local images i, divided by the local
    batch size B. Across processes OpenCLIP passes text features round a ring of neighbour exchanges; this
    all-gathers them instead, which gives the same per-rank loss and, with ``gather_with_grad``, the same
    gradients. As with OpenCLIP, each rank's loss is normalised by the *local* batch size, so the mean over
    ranks equals the single-process loss on the whole global batch.

    Args:
        local_loss: accepted for a uniform signature; SigLIP is always computed on this rank's image rows.
        gather_with_grad: gather text features with gradients (OpenCLIP's exchange always carries them).
        chunk_size: if set, compute the loss over blocks of this many image rows without holding the
            (B, B_global) logits in the forward or the backward; computed in at least float32.
    """

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor | None = None
    ) -> Tensor:
        """The scalar loss.

        Args:
            image_features: L2-normalised (B, E), this rank's slice of the batch.
            text_features: L2-normalised (B, E), paired row by row with ``image_features``.
            logit_scale: the exponentiated scale (a scalar tensor).
            logit_bias: the learned bias; required.
        """
        if logit_bias is None:
            raise ValueError("SigLipLoss needs logit_bias (a model built with init_logit_bias, e.g. -10)")
        rank, world_size = rank_world()
        b = image_features.shape[0]
        offset = 0
        all_text = text_features
        if world_size > 1:
            all_text = _gather(text_features, rank, world_size, with_grad=self.gather_with_grad, keep_local_grad=True)
            offset = rank * b
        if self.chunk_size is None:
            logits = logit_scale * image_features @ all_text.t() + logit_bias  # (B, B_global)
            labels = -torch.ones_like(logits)
            labels[:, offset : offset + b] += 2 * torch.eye(b, device=logits.device, dtype=logits.dtype)
            return -F.logsigmoid(labels * logits).sum() / b
        # -log sigmoid(z) = softplus(-z) = softplus(z) - z: every pair as a negative, minus z on the positives.
        image, text, scale, bias = _upcast(image_features, all_text, logit_scale, logit_bias)
        neg = _ChunkedPairReduce.apply(image, text, scale, bias, self.chunk_size, "softplus")
        pos = _pair_logits(image, text[offset : offset + b], scale, bias).sum()
        return (neg - pos) / b


class DistillLoss(NamedTuple):
    """The two parts of `DistillClipLoss`, each a scalar; training minimises their sum, `total`."""

    contrastive: Tensor
    distill: Tensor

    @property
    def total(self) -> Tensor:
        return self.contrastive + self.distill


def _soft_cross_entropy(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Cross-entropy from the teacher's softmax to the student's, per row, averaged over rows."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)


class DistillClipLoss(ClipLoss):
    """CLIP's loss plus distillation from a teacher CLIP, matching OpenCLIP's ``DistillClipLoss`` in value and
    gradients: the student's contrastive loss, and the cross-entropy from the teacher's softmax over its image-text
    logits to the student's, for both directions, averaged; the two parts weigh the same.

    The teacher's features are gathered across processes as the student's are (they carry no gradient). Takes
    `ClipLoss`'s arguments but `chunk_size`: the soft targets need every row's whole logits.
    """

    def __init__(self, *, local_loss: bool = False, gather_with_grad: bool = True, chunk_size: int | None = None):
        if chunk_size is not None:
            raise ValueError("distillation computes the whole logit matrices: use chunk_size None (loss.chunk_size)")
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        teacher_image_features: Tensor,
        teacher_text_features: Tensor,
        teacher_logit_scale: Tensor,
        logit_bias: Tensor | None = None,
    ) -> DistillLoss:
        """Both parts of the loss.

        Args:
            image_features, text_features, logit_scale: the student's, as `ClipLoss` takes them.
            teacher_image_features, teacher_text_features, teacher_logit_scale: the teacher's for the same batch
                (computed without gradients).
            logit_bias: the student's, if it has one: it changes neither part (softmax ignores a constant).
        """
        student, offset = self._queries(image_features, text_features)
        teacher, _ = self._queries(teacher_image_features, teacher_text_features)
        contrastive, distill = [], []
        for (q, k), (tq, tk) in zip(student, teacher):
            logits = logit_scale * q @ k.t()  # (n, M)
            if logit_bias is not None:
                logits = logits + logit_bias
            labels = torch.arange(q.shape[0], device=q.device) + offset
            contrastive.append(F.cross_entropy(logits, labels))
            distill.append(_soft_cross_entropy(teacher_logit_scale * tq @ tk.t(), logits))
        return DistillLoss((contrastive[0] + contrastive[1]) / 2, (distill[0] + distill[1]) / 2)


def build_loss(kind: str, distill: bool = False, **kwargs) -> nn.Module:
    """Build a contrastive loss.

    Args:
        kind: "clip" (softmax, `ClipLoss`) or "siglip" (sigmoid, `SigLipLoss`).
        distill: learn from a teacher too (`DistillClipLoss`, which returns a `DistillLoss`); kind "clip" only.
        **kwargs: keyword arguments of the loss class (local_loss, gather_with_grad, chunk_size).
    """
    if distill:
        if kind != "clip":
            raise ValueError(f"distillation takes loss kind 'clip' (OpenCLIP's DistillClipLoss), not {kind!r}")
        return DistillClipLoss(**kwargs)
    if kind == "clip":
        return ClipLoss(**kwargs)
    if kind == "siglip":
        return SigLipLoss(**kwargs)
    raise ValueError(f"unknown loss kind {kind!r}; valid kinds: {', '.join(_KINDS)}")
