"""Inference-only rewrites of the convolutional image towers: BatchNorm folded into convolutions, channels-last."""

from __future__ import annotations

import torch
from torch import nn


class FoldedBatchNorm(nn.Identity):
    """Stands where a BatchNorm2d was folded into the convolution before it: passes its input through.

    A folded model is for inference only. Its BatchNorm statistics are gone, so training it would train a different
    model (convolutions with biases, no normalisation): `train()` is refused instead.
    """

    def __init__(self):
        super().__init__()
        self.training = False

    def train(self, mode: bool = True) -> FoldedBatchNorm:
        if mode:
            raise RuntimeError("this model's BatchNorm layers were folded into its convolutions (fold_batchnorm), "
                               "which is for inference only; to train, build or load the model again")  # fmt: skip
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # set without train(), e.g. `module.training = True`
            raise RuntimeError("a model with folded BatchNorm layers cannot run in training mode")
        return x


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold the running statistics of each BatchNorm2d into the convolution before it, in place, for inference.

    y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta is one convolution with weight w * s and bias
    (b - mean) * s + beta, s = gamma / sqrt(var + eps): one pass over the activations fewer per layer. The folded
    weights are computed in float64 and stored in each convolution's dtype; the features stay the same up to float
    rounding (max |diff| of normalised RN50 embeddings ~1e-7).

    Only the (conv, BN) pairs that a module declares in its `FOLD_PAIRS` (clipworks' ResNet tower) are folded, so no
    BatchNorm is folded into a convolution it does not directly follow. The model is put in eval mode; afterwards
    it cannot be put back in training mode, and its state dict no longer fits a checkpoint layout (save the model
    before folding). Calling this again folds nothing.

    Returns:
        the number of BatchNorm layers folded.
    """
    model.eval()
    folded = 0
    for module in list(model.modules()):
        for conv_name, bn_name in getattr(module, "FOLD_PAIRS", ()):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if isinstance(bn, FoldedBatchNorm):
                continue
            _fold_into(conv, bn)
            setattr(module, bn_name, FoldedBatchNorm())
            folded += 1
    return folded


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d), (type(conv), type(bn))
    assert bn.running_mean is not None and bn.running_var is not None, "BatchNorm without running statistics"
    w = conv.weight.double()
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)  # (C_out,)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    conv.weight.copy_(w * scale.reshape(-1, 1, 1, 1))  # copy_ keeps the weight's dtype and memory format
    conv.bias = nn.Parameter(((bias - mean) * scale + beta).to(conv.weight.dtype))


def optimize_for_inference(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """Ready a model's ResNet image tower for fp32/bf16 inference, in place: BatchNorm folded into the convolutions
    (`fold_batchnorm`) and, with `channels_last`, the tower's weights stored channels-last, which oneDNN's CPU
    convolutions prefer (RN50 fp32 on 2 cores, batch 16: ~1.2x the folded model's speed). Idempotent.

    ConvNeXt is left as it is: it has no BatchNorm, and channels-last measured no faster for convnext_base (its time
    is in the MLP's matrix products); `benchmarks/bench_convnets.py` times both layouts. Other towers are untouched.

    Returns:
        `model`, in eval mode, not trainable afterwards where a BatchNorm was folded.
    """
    from clipworks.models.resnet import ModifiedResNet

    fold_batchnorm(model)
    if channels_last:
        for module in model.modules():
            if isinstance(module, ModifiedResNet):
                module.to(memory_format=torch.channels_last)
    return model
