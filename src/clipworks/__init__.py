"""clipworks: CLIP models, tokenizer and preprocessing identical to the references, in one package."""

from .checkpoints.io import CheckpointError
from .config import CLIPConfig, ConvNeXtConfig, PreprocessConfig, ResNetConfig, TextConfig, VisionTransformerConfig
from .factory import create_model, create_model_and_transforms, get_tokenizer
from .models.clip import CLIP, CLIPOutput
from .presets import get_preset, list_models
from .tokenizer import TokenizedText, Tokenizer, default_tokenizer

__version__ = "0.1.0"


def save_pretrained(model: CLIP, path, preprocess: PreprocessConfig | None = None):
    """Write `model` as a clipworks checkpoint directory (config.json + model.safetensors).

    The preprocessing config is stored with the weights; it defaults to the one the model was loaded with.
    """
    from .checkpoints.native import save_clipworks
    from .factory import default_preprocess

    preprocess = preprocess or getattr(model, "preprocess_config", None) or default_preprocess(model.config)
    return save_clipworks(model, path, preprocess)


__all__ = [
    "CLIP", "CLIPConfig", "CLIPOutput", "CheckpointError", "ConvNeXtConfig", "PreprocessConfig", "ResNetConfig",
    "TextConfig", "VisionTransformerConfig", "create_model", "create_model_and_transforms", "get_preset",
    "get_tokenizer", "list_models", "save_pretrained", "TokenizedText", "Tokenizer", "default_tokenizer",
]  # fmt: skip
