"""The CLIP model: an image tower and a text tower meeting in one embedding space."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import CLIPConfig, VisionConfig
from .text import TextHidden


class CLIPOutput(NamedTuple):
    """Normalised features of both towers and the learned temperature (and bias, for sigmoid-loss models).

    Attributes:
        image_features: (B, E), unit norm.
        text_features: (B', E), unit norm.
        logit_scale: exp of the learned log temperature, a scalar.
        logit_bias: the learned bias (SigLIP), or None.
    """

    image_features: Tensor
    text_features: Tensor
    logit_scale: Tensor
    logit_bias: Tensor | None

    def logits(self) -> tuple[Tensor, Tensor]:
        """(logits_per_image (B, B'), logits_per_text (B', B))."""
        logits = self.logit_scale * self.image_features @ self.text_features.t()
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits, logits.t()


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

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """Images (B, 3, H, W), preprocessed, to features (B, E)."""
        self._tower("vision")
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """Token ids (B, L) to features (B, E); padding past the longest sequence costs nothing."""
        self._tower("text")
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

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

    # --- end of CoCa ---

    def forward(self, images: Tensor, tokens: Tensor) -> CLIPOutput:
        return CLIPOutput(
            self.encode_image(images, normalize=True),
            self.encode_text(tokens, normalize=True),
            self.logit_scale.exp(),
            self.logit_bias,
        )
