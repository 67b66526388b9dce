"""clipworks: CLIP models, tokenizer and preprocessing identical to the references, in one package."""

from .checkpoints.export import save_pretrained
from .checkpoints.io import CheckpointError
from .config import (
    CLIPConfig, ConvNeXtConfig, PreprocessConfig, ResNetConfig, TextConfig, TimmVisionConfig, TokenizerConfig,
    VisionTransformerConfig,
)  # fmt: skip
from .factory import create_model, create_model_and_transforms, get_tokenizer
from .models.clip import CLIP, CLIPOutput
from .models.quant import quantize_int8
from .models.timm_tower import reparameterize
from .presets import get_preset, list_models
from .pretrained import PretrainedEntry, get_pretrained, list_pretrained
from .hf_tokenizer import HFTokenizer
from .models.clip import MissingTowerError
from .tokenizer import TextTokenizer, TokenizedText, Tokenizer, default_tokenizer

__version__ = "0.1.0"


__all__ = [
    "CLIP", "CLIPConfig", "CLIPOutput", "CheckpointError", "ConvNeXtConfig", "PreprocessConfig", "ResNetConfig",
    "TextConfig", "VisionTransformerConfig", "create_model", "create_model_and_transforms", "get_preset",
    "get_tokenizer", "list_models", "save_pretrained", "TokenizedText", "Tokenizer", "default_tokenizer",
    "PretrainedEntry", "get_pretrained", "list_pretrained", "quantize_int8", "HFTokenizer", "TextTokenizer",
    "TokenizerConfig", "MissingTowerError", "TimmVisionConfig", "reparameterize",
]  # fmt: skip
