"""Image towers timm builds by model name, with OpenCLIP's `TimmModel` head: EVA-CLIP, PE-Core, ViTamin, MobileCLIP.

A thin adapter, not a port: the trunk is timm's own module, built with the arguments OpenCLIP's `TimmModel` passes,
and the head is the one `TimmModel` adds, so the numbers (and the speed) are timm's by construction. The keys are
OpenCLIP's (`trunk.*` for timm's model, `head.*` for the added projection); the conversion at the boundary is a
prefix rule that names any other key.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict

import torch
from torch import Tensor, nn

from ..config import TimmVisionConfig
from .precision import model_dtype

_PREFIXES = ("trunk.", "head.")


def _import_timm():
    try:
        import timm
    except ImportError as e:
        raise ImportError(f"timm image towers (EVA-CLIP, PE-Core, ViTamin, MobileCLIP) need timm ({e.name} is "
                          "missing): pip install 'clipworks[timm]'") from e  # fmt: skip
    return timm


class TimmTower(nn.Module):
    """timm's model `cfg.model_name` as the trunk, then OpenCLIP's head: (B, 3, H, W) images to (B, E) features.

    With projection None, timm's classifier (sized embed_dim) after timm's pooling `cfg.pool` is the projection and
    the head is empty; "none" leaves the pooled features as they are; "linear" and "mlp" replace timm's classifier
    with OpenCLIP's projection after timm's pooling (`cfg.pool`, or the model's own when "").

    Args:
        cfg: the tower's config.
        embed_dim: output size E.

    Raises:
        ValueError: a model name timm does not have, or pooled features of a size other than embed_dim with
            projection "none".
    """

    def __init__(self, cfg: TimmVisionConfig, embed_dim: int):
        super().__init__()
        timm = _import_timm()
        if not timm.is_model(cfg.model_name):
            close = difflib.get_close_matches(cfg.model_name, timm.list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"timm {timm.__version__} has no model {cfg.model_name!r}{hint}")
        self.config = cfg
        self.image_size = (cfg.image_size, cfg.image_size)  # (H, W), as OpenCLIP's TimmModel says it
        kwargs = dict(cfg.model_kwargs)
        if cfg.drop_path is not None:
            kwargs["drop_path_rate"] = cfg.drop_path
        if cfg.projection in (None, "none"):
            num_classes = 0 if cfg.projection == "none" else embed_dim
            self.trunk = timm.create_model(cfg.model_name, num_classes=num_classes, global_pool=cfg.pool, **kwargs)
            width = self.trunk.num_features if cfg.projection == "none" else embed_dim
            if width != embed_dim:
                raise ValueError(f"projection 'none' needs {cfg.model_name}'s {width} pooled features to equal "
                                 f"embed_dim {embed_dim}")  # fmt: skip
        else:
            self.trunk = timm.create_model(cfg.model_name, **kwargs)
            self.trunk.reset_classifier(0, **({"global_pool": cfg.pool} if cfg.pool else {}))
            width = self.trunk.num_features
        self.head = _head(cfg, width, embed_dim)
        self.reparameterized = False  # set by `reparameterize`: the fused trunk's keys fit no checkpoint layout
        self.register_load_state_dict_post_hook(_materialize_computed_buffers)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's gradient checkpointing of the trunk's blocks (training only)."""
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, images: Tensor) -> Tensor:
        """Map (B, 3, H, W) images to (B, E) unnormalised features."""
        return self.head(self.trunk(images.to(model_dtype(self.trunk))))  # float32 pixels into a bf16/fp16 trunk


def _head(cfg: TimmVisionConfig, width: int, embed_dim: int) -> nn.Sequential:
    """OpenCLIP's `TimmModel.head`, with its module names (its dropout is 0: OpenCLIP's configs use no other)."""
    layers = OrderedDict()
    if cfg.projection == "linear":
        layers["drop"] = nn.Dropout(0.0)
        layers["proj"] = nn.Linear(width, embed_dim, bias=cfg.proj_bias)
    elif cfg.projection == "mlp":
        from timm.layers import Mlp

        layers["mlp"] = Mlp(width, 2 * embed_dim, embed_dim, drop=(0.0, 0.0), bias=(True, cfg.proj_bias))
    return nn.Sequential(layers)


def _materialize_computed_buffers(tower: nn.Module, incompatible_keys) -> None:
    """After a load into a tower built on the meta device (`load_state_dict(assign=True)`), the checkpoint's tensors
    are real but the buffers timm computes rather than saves (RoPE tables, EVA's zero key bias) are still meta:
    allocate them beside the weights and let timm compute them (`init_non_persistent_buffers`, timm's own way)."""
    params = list(tower.parameters())
    if not params or any(p.is_meta for p in params):
        return  # not loaded yet (or only partly): nothing to compute the buffers beside
    device = params[0].device
    for name, module in tower.named_modules():
        meta = [k for k, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        if not hasattr(module, "init_non_persistent_buffers"):
            raise RuntimeError(f"timm module {name} ({type(module).__name__}) has computed buffers {meta} that it "
                               "cannot rebuild after a meta-device load; build the model on a real device")  # fmt: skip
        for k in meta:
            module._buffers[k] = torch.empty_like(module._buffers[k], device=device)
        module.init_non_persistent_buffers()


def reparameterize(model: nn.Module) -> nn.Module:
    """Fuse a model's image tower for inference, in place, through timm's `reparameterize_model`: MobileCLIP's
    FastViT / MobileOne blocks turn their parallel train-time branches (convolutions with BatchNorms, identity
    paths) into single convolutions. The features stay the same up to float rounding, for less work.

    OpenCLIP's library does not do this itself (Apple's MobileCLIP code does). Towers without such blocks are left
    as they are. A fused model is for inference only: it is put in eval mode, cannot be trained, and fits no
    checkpoint layout (save the model before fusing it).

    Returns:
        `model`, fused.
    """
    tower = getattr(model, "visual", None)
    if not isinstance(tower, TimmTower) or tower.reparameterized:  # timm's fusing is not idempotent: fuse once
        return model
    from timm.models import reparameterize_model

    before = set(tower.state_dict())
    model.eval()
    reparameterize_model(tower.trunk, inplace=True)
    tower.reparameterized = set(tower.state_dict()) != before
    return model


def convert_from_open_clip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP's `visual.` subtree of a TimmModel (prefix removed) to this tower's keys: the same names.

    Raises:
        ValueError: keys outside `trunk.` and `head.`, named.
    """
    return _check_prefixes(sd)


def convert_to_open_clip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """This tower's keys to OpenCLIP's `visual.` subtree of a TimmModel (prefix removed): the same names."""
    return _check_prefixes(sd)


def _check_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    unknown = sorted(k for k in sd if not k.startswith(_PREFIXES))
    if unknown:
        raise ValueError(f"unexpected keys: no conversion rule for {len(unknown)} key(s) of a timm image tower "
                         f"(expected trunk.* and head.*): {unknown[:20]}")  # fmt: skip
    return dict(sd)
