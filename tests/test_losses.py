"""Contrastive losses: parity with OpenCLIP, chunked == dense, and the two-process (gloo) semantics."""

import math
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip import loss as oc_loss
from torch import nn

from clipworks.train.losses import (
    MAX_LOGIT_SCALE,
    ClipLoss,
    DistillClipLoss,
    SigLipLoss,
    build_loss,
    clamp_logit_scale_,
    init_logit_scale,
)

B, E = 8, 16
WORLD = 2
JOIN_TIMEOUT_S = 60


def _inputs(seed: int = 0, batch: int = B):
    """Normalised leaf features plus scale (exp of a log scale near CLIP's init) and bias, all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, E, generator=g, dtype=torch.float64), dim=-1).float()
    text = F.normalize(torch.randn(batch, E, generator=g, dtype=torch.float64), dim=-1).float()
    scale = torch.tensor(math.log(1 / 0.07) + 0.3 * torch.randn((), generator=g).item()).exp()
    bias = torch.tensor(-10.0 + torch.randn((), generator=g).item())
    return [t.clone().requires_grad_() for t in (image, text, scale, bias)]


def _value_and_grads(loss_fn, image, text, scale, bias):
    loss = loss_fn(image, text, scale, bias)
    grads = torch.autograd.grad(loss, (image, text, scale, bias), allow_unused=True)
    return loss.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (image, text, scale, bias))]


def _assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    """Elementwise closeness with ``atol`` relative to the tensor's scale: float32 sums in another order differ
    by a few ulps of the largest entry, not of each entry."""
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol * max(1.0, e.abs().max().item()))


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (ClipLoss(), oc_loss.ClipLoss()),
        (SigLipLoss(), oc_loss.SigLipLoss()),
    ],
    ids=["clip", "siglip"],
)
def test_matches_open_clip_single_process(ours, theirs):
    inputs = _inputs()
    loss, grads = _value_and_grads(ours, *inputs)
    ref_loss, ref_grads = _value_and_grads(theirs, *inputs)
    _assert_close([loss, *grads], [ref_loss, *ref_grads])


def test_clip_loss_without_bias_matches_open_clip():
    image, text, scale, _ = _inputs(1)
    loss = ClipLoss()(image, text, scale)
    ref = oc_loss.ClipLoss()(image, text, scale)
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 8, 11])
def test_chunked_equals_dense(kind, chunk_size):
    inputs = _inputs(2)
    dense = _value_and_grads(build_loss(kind), *inputs)
    chunked = _value_and_grads(build_loss(kind, chunk_size=chunk_size), *inputs)
    _assert_close([chunked[0], *chunked[1]], [dense[0], *dense[1]])


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_chunked_equals_dense_in_float64(kind):
    """In float64 the two paths agree to ~1e-12: the chunked math is exact, not an approximation."""
    inputs = [t.detach().double().requires_grad_() for t in _inputs(5)]
    dense = _value_and_grads(build_loss(kind), *inputs)
    chunked = _value_and_grads(build_loss(kind, chunk_size=3), *inputs)
    _assert_close([chunked[0], *chunked[1]], [dense[0], *dense[1]], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_chunked_half_precision_accumulates_in_float32(kind):
    image, text, scale, bias = _inputs(6)
    ref = build_loss(kind)(image, text, scale, bias)
    half = [t.detach().bfloat16().requires_grad_() for t in (image, text)]
    loss = build_loss(kind, chunk_size=3)(*half, scale, bias)
    loss.backward()
    assert loss.dtype == torch.float32
    assert half[0].grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)


def test_chunked_never_builds_the_full_matrix(monkeypatch):
    """The chunked path only multiplies (chunk, B) logit blocks, in the forward and the backward."""
    shapes = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_matmul(a, b)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    image, text, scale, bias = _inputs(3, batch=12)
    loss = ClipLoss(chunk_size=4)(image, text, scale, bias)
    loss.backward()
    assert (4, 12) in shapes
    assert (12, 12) not in shapes


def test_build_loss_rejects_unknown_kind():
    with pytest.raises(ValueError, match="clip, siglip"):
        build_loss("infonce")
    with pytest.raises(ValueError, match="clip, siglip"):
        init_logit_scale("infonce")


def test_distill_matches_open_clip_single_process():
    """OpenCLIP's DistillClipLoss on the same inputs: both parts, and the gradients of their sum, within 1e-6."""
    image, text, scale, _ = _inputs(seed=1)
    teacher_image, teacher_text, teacher_scale, _ = (t.detach() for t in _inputs(seed=2))
    ours = DistillClipLoss()(image, text, scale, teacher_image, teacher_text, teacher_scale * 2)
    theirs = oc_loss.DistillClipLoss()(image, text, scale, teacher_image, teacher_text, teacher_scale * 2)
    assert ours.distill > 0 and ours.contrastive > 0
    for a, b in zip(ours, theirs):
        assert abs(a.item() - b.item()) <= 1e-6
    grads = torch.autograd.grad(ours.total, (image, text, scale))
    expected = torch.autograd.grad(theirs[0] + theirs[1], (image, text, scale))
    for g, e in zip(grads, expected):
        assert (g - e).abs().max().item() <= 1e-6


def test_distill_loss_is_for_the_softmax_loss_whole():
    assert isinstance(build_loss("clip", distill=True), DistillClipLoss)
    with pytest.raises(ValueError, match="'clip'.*'siglip'"):
        build_loss("siglip", distill=True)
    with pytest.raises(ValueError, match="chunk_size None"):
        build_loss("clip", distill=True, chunk_size=4)


def test_siglip_requires_bias():
    image, text, scale, _ = _inputs()
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(image, text, scale)


def test_logit_scale_init_and_clamp():
    assert init_logit_scale("clip") == pytest.approx(math.log(1 / 0.07))
    assert init_logit_scale("siglip") == pytest.approx(math.log(10))
    model = nn.Module()
    model.logit_scale = nn.Parameter(torch.tensor(7.0))
    wrapped = nn.Module()
    wrapped.module = model  # stands in for DistributedDataParallel's .module
    clamp_logit_scale_(wrapped)
    assert model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)
    assert model.logit_scale.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# Two processes, gloo on the CPU. One spawn runs every distributed case; each rank saves its results to a file.
# ---------------------------------------------------------------------------------------------------------------

_DIST_CASES = {
    # name: (our loss, OpenCLIP's loss factory (rank, world) -> module)
    "clip_global": (
        lambda: ClipLoss(local_loss=False, gather_with_grad=True),
        lambda r, w: oc_loss.ClipLoss(local_loss=False, gather_with_grad=True, rank=r, world_size=w),
    ),
    "clip_local": (
        lambda: ClipLoss(local_loss=True, gather_with_grad=True),
        lambda r, w: oc_loss.ClipLoss(local_loss=True, gather_with_grad=True, rank=r, world_size=w),
    ),
    "clip_global_chunked": (
        lambda: ClipLoss(local_loss=False, gather_with_grad=True, chunk_size=3),
        lambda r, w: oc_loss.ClipLoss(local_loss=False, gather_with_grad=True, rank=r, world_size=w),
    ),
    "clip_local_chunked": (
        lambda: ClipLoss(local_loss=True, gather_with_grad=True, chunk_size=3),
        lambda r, w: oc_loss.ClipLoss(local_loss=True, gather_with_grad=True, rank=r, world_size=w),
    ),
    "clip_global_nograd": (
        lambda: ClipLoss(local_loss=False, gather_with_grad=False),
        lambda r, w: oc_loss.ClipLoss(local_loss=False, gather_with_grad=False, rank=r, world_size=w),
    ),
    "siglip": (
        lambda: SigLipLoss(),
        lambda r, w: oc_loss.SigLipLoss(rank=r, world_size=w),
    ),
    "siglip_chunked": (
        lambda: SigLipLoss(chunk_size=3),
        lambda r, w: oc_loss.SigLipLoss(rank=r, world_size=w),
    ),
}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    try:
        results = {}
        for name, (ours, theirs) in _DIST_CASES.items():
            image, text, scale, bias = _inputs(4)  # the same global batch on every rank
            rows = slice(rank * B // world, (rank + 1) * B // world)
            local = [image.detach()[rows].clone().requires_grad_(), text.detach()[rows].clone().requires_grad_()]
            shared = [scale.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()]
            results[name] = {
                "ours": _value_and_grads(ours(), *local, *shared),
                "open_clip": _value_and_grads(theirs(rank, world), *local, *shared),
            }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run every distributed case on two gloo ranks; returns {case: [rank0, rank1]} of (loss, grads)."""
    out = tmp_path_factory.mktemp("dist")
    ctx = torch.multiprocessing.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=False)
    try:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        # join() returns False as soon as one worker exits while another still runs, hence the loop.
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {JOIN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    per_rank = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {name: [per_rank[r][name] for r in range(WORLD)] for name in _DIST_CASES}


def _single_process(kind: str):
    return _value_and_grads(build_loss(kind), *_inputs(4))


def _stitched(ranks, which):
    """The ranks' feature gradients put back in global batch order: (B, E) for images and for texts."""
    return [torch.cat([r[which][1][i] for r in ranks]) for i in (0, 1)]


@pytest.mark.parametrize("case", list(_DIST_CASES))
def test_two_ranks_match_open_clip(two_ranks, case):
    for rank in two_ranks[case]:
        (loss, grads), (ref_loss, ref_grads) = rank["ours"], rank["open_clip"]
        _assert_close([loss, *grads], [ref_loss, *ref_grads])


@pytest.mark.parametrize(
    "case", ["clip_global", "clip_global_chunked", "clip_local", "clip_local_chunked", "siglip", "siglip_chunked"]
)
def test_two_ranks_match_single_process(two_ranks, case):
    """Mean over ranks of the loss == the single-process loss on the whole batch, and the gradients follow
    the DDP convention: each rank's feature gradient, divided by the world size (DDP's average), equals the
    single-process gradient for those rows; the scale/bias gradients averaged over ranks equal the single ones.
    """
    ranks = two_ranks[case]
    loss, (g_image, g_text, g_scale, g_bias) = _single_process("siglip" if case.startswith("siglip") else "clip")
    torch.testing.assert_close(sum(r["ours"][0] for r in ranks) / WORLD, loss)
    if case.startswith("clip_global"):  # every rank computes the whole matrix: the same loss everywhere
        for r in ranks:
            torch.testing.assert_close(r["ours"][0], loss)
    image_grad, text_grad = _stitched(ranks, "ours")
    _assert_close([image_grad / WORLD, text_grad / WORLD], [g_image, g_text])
    mean_scale = sum(r["ours"][1][2] for r in ranks) / WORLD
    mean_bias = sum(r["ours"][1][3] for r in ranks) / WORLD
    _assert_close([mean_scale, mean_bias], [g_scale, g_bias])
