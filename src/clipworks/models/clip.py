"""The CLIP model: an image tower and a text tower meeting in one embedding space."""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import CLIPConfig, VisionConfig
from .text import TextHidden


def _logits(out) -> tuple[Tensor, Tensor]:
    logits = out.logit_scale * out.image_features @ out.text_features.t()
    if out.logit_bias is not None:
        logits = logits + out.logit_bias
    return logits, logits.t()


class CLIPOutput(NamedTuple):
    """What a model without a logit bias returns: normalised features of both towers and the learned temperature.
    It unpacks as OpenCLIP's output does: `image_features, text_features, logit_scale = model(image, text)`.

    Attributes:
        image_features: (B, E), unit norm; None when no image was given.
        text_features: (B', E), unit norm; None when no text was given.
        logit_scale: exp of the learned log temperature, a scalar.
    """

    image_features: Tensor | None
    text_features: Tensor | None
    logit_scale: Tensor

    @property
    def logit_bias(self) -> None:
        """None: this model has no bias (see `SigLIPOutput`); lets code read `.logit_bias` of either output."""
        return None

    def logits(self) -> tuple[Tensor, Tensor]:
        """(logits_per_image (B, B'), logits_per_text (B', B))."""
        return _logits(self)


class SigLIPOutput(NamedTuple):
    """What a model with a logit bias (SigLIP, sigmoid-loss training) returns; four fields, as OpenCLIP's output:
    `image_features, text_features, logit_scale, logit_bias = model(image, text)`."""

    image_features: Tensor | None
    text_features: Tensor | None
    logit_scale: Tensor
    logit_bias: Tensor

    def logits(self) -> tuple[Tensor, Tensor]:
        """(logits_per_image (B, B'), logits_per_text (B', B)), the bias added."""
        return _logits(self)


def build_image_tower(cfg: VisionConfig, embed_dim: int) -> nn.Module:
    """The image tower a config describes; every tower maps (B, 3, H, W) to (B, embed_dim)."""
    if cfg.kind == "vit":
        from .vit import VisionTransformer

        return VisionTransformer(cfg, embed_dim)
    if cfg.kind == "resnet":
        from .resnet import ModifiedResNet

        return ModifiedResNet(cfg, embed_dim)
    if cfg.kind == "convnext":
        from .convnext import ConvNeXt

        return ConvNeXt(cfg, embed_dim)
    if cfg.kind == "timm":  # built by timm by model name (EVA-CLIP, PE-Core, ViTamin, MobileCLIP)
        from .timm_tower import TimmTower

        return TimmTower(cfg, embed_dim)
    raise ValueError(f"unknown vision tower kind {cfg.kind!r}; expected 'vit', 'resnet', 'convnext' or 'timm'")


def build_text_tower(cfg, embed_dim: int) -> nn.Module:
    """The text tower a config describes; every tower maps token ids (B, L) to (B, embed_dim) and has
    `forward_hidden` (every layer's states) and `set_grad_checkpointing`."""
    if cfg.kind == "transformer":
        from .text import TextTransformer

        return TextTransformer(cfg, embed_dim)
    from .hf_text import build_hf_text_tower  # the Hugging Face encoder families (RoBERTa, XLM-R, mT5, NLLB)

    return build_hf_text_tower(cfg, embed_dim)


class MissingTowerError(ValueError):
    """A one-tower model was asked to encode with the tower it does not have."""


class CLIP(nn.Module):
    """Two towers and a learnable temperature (plus a bias for sigmoid-loss models such as SigLIP).

    A model loaded from a one-tower checkpoint (transformers' `CLIPVisionModelWithProjection` or
    `CLIPTextModelWithProjection`) has `visual` or `text` set to None; encoding with the missing tower raises
    `MissingTowerError`.
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.visual = None if cfg.vision is None else build_image_tower(cfg.vision, cfg.embed_dim)
        self.text = None if cfg.text is None else build_text_tower(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = None if cfg.init_logit_bias is None else nn.Parameter(torch.tensor(cfg.init_logit_bias))
        self.output_dict = False  # forward returns OpenCLIP's dict instead of a tuple (create_model(output_dict=))
        # CoCa's caption decoder (models/coca.py); None for every other model
        self.decoder = None
        if cfg.decoder is not None:
            from .coca import build_caption_decoder

            self.decoder = build_caption_decoder(cfg)

    @property
    def image_size(self) -> int:
        return self._tower("vision").image_size

    @property
    def context_length(self) -> int:
        return self._tower("text").context_length

    def _tower(self, which: str):
        """The config of tower `which` ("vision" or "text"); a clear error when the model lacks it."""
        cfg = getattr(self.config, which)
        if cfg is None:
            what = "image" if which == "vision" else "text"
            raise MissingTowerError(f"this model has no {what} tower (it was loaded from a one-tower checkpoint), "
                                    f"so it cannot encode {what}s")  # fmt: skip
        return cfg

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for tower in (self.visual, self.text, self.decoder):
            if tower is not None:
                tower.set_grad_checkpointing(enable)

    def set_patch_dropout(self, fraction: float) -> None:
        """Drop this fraction of a ViT image tower's patch tokens at random in training mode (FLIP; OpenCLIP's
        `force_patch_dropout`): the class token is kept, evaluation sees every patch, 0 disables it.

        Raises:
            ValueError: a fraction outside [0, 1), or a non-zero one for an image tower without patch tokens
                (ResNet, ConvNeXt, timm).
        """
        if hasattr(self.visual, "set_patch_dropout"):
            self.visual.set_patch_dropout(fraction)
        elif fraction:
            self._tower("vision")
            raise ValueError(f"patch dropout {fraction}: only ViT image towers drop patch tokens; this model's image "
                             f"tower is a {type(self.visual).__name__} (use patch dropout 0)")  # fmt: skip

    def add_logit_bias(self, bias: float, init_logit_scale: float, init_logit_bias: float) -> None:
        """Give a model without a logit bias a learned one (for sigmoid-loss training), starting at `bias`; the
        config records `init_logit_scale` and `init_logit_bias`, so that a saved model reloads with its bias.

        Raises:
            ValueError: the model has a logit bias already.
        """
        if self.logit_bias is not None:
            raise ValueError("this model has a logit bias already")
        self.config = replace(self.config, init_logit_scale=init_logit_scale, init_logit_bias=init_logit_bias)
        self.logit_bias = nn.Parameter(torch.tensor(float(bias), dtype=self.logit_scale.dtype,
                                                    device=self.logit_scale.device))  # fmt: skip

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        """Images (B, 3, H, W), preprocessed, to features (B, E)."""
        self._tower("vision")
        x = self.visual(image)
        return F.normalize(x.float(), dim=-1) if normalize else x  # float32 from a bf16/fp16 model too

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        """Token ids (B, L) to features (B, E); padding past the longest sequence costs nothing."""
        self._tower("text")
        x = self.text(text)
        return F.normalize(x.float(), dim=-1) if normalize else x  # float32 from a bf16/fp16 model too

    def encode_text_hidden(self, tokens: Tensor) -> TextHidden:
        """Every text layer's hidden states, the final-norm states and the pooled features (diffusion use)."""
        self._tower("text")
        return self.text.forward_hidden(tokens)

    # --- CoCa ---

    def caption_logits(self, images: Tensor, tokens: Tensor) -> Tensor:
        """CoCa's caption logits (B, L, V): at each position of `tokens` (B, L), the next token's, given the tokens
        up to it and the image. OpenCLIP's `CoCa(images, tokens, output_labels=False)["logits"]`; its default
        (`output_labels=True`) is `[:, :-1]` of these, the positions a label follows.

        Raises:
            ValueError: the model has no caption decoder.
        """
        if self.decoder is None:
            raise ValueError("this model has no caption decoder (only CoCa models have one)")
        image_tokens = self.visual.forward_caption_tokens(images)  # (B, N, D)
        text_states = self.text.forward_hidden(tokens).hidden_states[-1]  # (B, L, D), before ln_final
        return self.decoder(image_tokens, text_states)

    def generate(self, images: Tensor, **kwargs) -> Tensor:
        """CoCa's caption token ids for `images`, as OpenCLIP's `CoCa.generate` makes them: `models.coca.generate`,
        whose keyword arguments (generation_type, seq_len, top_k, top_p, ...) it takes.

        Raises:
            ValueError: the model has no caption decoder, or a setting is out of range.
        """
        from .coca import generate

        return generate(self, images, **kwargs)

    # --- end of CoCa ---

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the image tower (LiT), OpenCLIP's way: `unlocked_groups` groups from the top stay trainable (a ViT's
        groups: the embeddings, each block, the last block with the final norm, the projection).

        Raises:
            ValueError: unlocked groups on a tower other than a ViT, or BatchNorm statistics to freeze on a tower
                without BatchNorm (`freeze_bn_stats` applies to ResNets: their BatchNorms stop updating).
        """
        self._tower("vision")
        _lock(self.visual, unlocked_groups, "image")
        if freeze_bn_stats:
            norms = [m for m in self.visual.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if not norms:
                raise ValueError("freeze_bn_stats=True: this image tower has no BatchNorm layers")
            for m in norms:  # normalise with the loaded running statistics, never update them, even in train mode
                m.register_forward_pre_hook(_frozen_batch_norm)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the text tower, OpenCLIP's way: `unlocked_layers` groups from the top stay trainable (the
        embeddings, each block, the last block with the final norm, the projection).

        Raises:
            ValueError: freeze_layer_norm=False (OpenCLIP does not support it either), or unlocked layers on a
                Hugging Face text tower.
        """
        if not freeze_layer_norm:
            raise ValueError("freeze_layer_norm=False is not supported: layer norms lock with the rest, as in OpenCLIP")
        self._tower("text")
        _lock(self.text, unlocked_layers, "text")

    def forward(self, image: Tensor | None = None, text: Tensor | None = None) -> CLIPOutput | SigLIPOutput | dict:
        """Normalised features of `image` (B, 3, H, W) and `text` token ids (B', L), either may be None, with the
        temperature (and bias): a `CLIPOutput` 3-tuple, a `SigLIPOutput` 4-tuple for a model with a logit bias, or
        OpenCLIP's dict when `output_dict` is set (`create_model(..., output_dict=True)`)."""
        image_features = None if image is None else self.encode_image(image, normalize=True)
        text_features = None if text is None else self.encode_text(text, normalize=True)
        scale = self.logit_scale.exp()
        if self.output_dict:
            out = {"image_features": image_features, "text_features": text_features, "logit_scale": scale}
            if self.logit_bias is not None:
                out["logit_bias"] = self.logit_bias
            return out
        if self.logit_bias is None:
            return CLIPOutput(image_features, text_features, scale)
        return SigLIPOutput(image_features, text_features, scale, self.logit_bias)


def _frozen_batch_norm(module: nn.Module, args) -> None:
    module.training = False


def _lock(tower: nn.Module, unlocked: int, what: str) -> None:
    """Freeze `tower`, then unfreeze its last `unlocked` groups (`tower.lock_groups()`: module or parameter lists,
    input to output)."""
    if unlocked < 0:
        raise ValueError(f"unlocked groups must be 0 or more, got {unlocked}")
    tower.requires_grad_(False)
    if unlocked == 0:
        return
    if not hasattr(tower, "lock_groups"):
        raise ValueError(f"this {what} tower ({type(tower).__name__}) can only be locked whole (unlocked groups 0)")
    for group in tower.lock_groups()[-unlocked:]:
        for part in group:  # a module or a parameter; None where the tower lacks that part
            if part is not None:
                part.requires_grad_(True)
