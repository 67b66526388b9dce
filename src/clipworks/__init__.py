"""clipworks: CLIP models, tokenizer and preprocessing identical to the references, in one package.

The names below are imported on first use (PEP 562), so that `import clipworks` and the command line's start do not
load torch: the command line sets OpenMP's wait policy before torch loads its OpenMP runtime (see
`clipworks.cli.configure_openmp`), and `clipworks --help` answers at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "save_pretrained": ".checkpoints.export",
    "CheckpointError": ".checkpoints.io",
    **dict.fromkeys(("CLIPConfig", "ConvNeXtConfig", "PreprocessConfig", "ResNetConfig", "TextConfig",
                     "TimmVisionConfig", "TokenizerConfig", "VisionTransformerConfig"), ".config"),
    **dict.fromkeys(("create_model", "create_model_and_transforms", "create_model_from_pretrained", "get_tokenizer",
                     "RandomWeightsWarning"), ".factory"),
    "get_model_config": ".compat",
    **dict.fromkeys(("CLIP", "CLIPOutput", "SigLIPOutput", "MissingTowerError"), ".models.clip"),
    "quantize_int8": ".models.quant",
    "apply_precision": ".models.precision",
    **dict.fromkeys(("fold_batchnorm", "optimize_for_inference"), ".models.fold"),
    **dict.fromkeys(("prepack_linears", "compile_for_inference"), ".models.fast"),
    "reparameterize": ".models.timm_tower",
    **dict.fromkeys(("get_preset", "list_models"), ".presets"),
    **dict.fromkeys(("PretrainedEntry", "get_pretrained", "list_pretrained"), ".pretrained"),
    "HFTokenizer": ".hf_tokenizer",
    **dict.fromkeys(("TextTokenizer", "TokenizedText", "Tokenizer", "default_tokenizer", "tokenize", "decode"),
                    ".tokenizer"),
}  # fmt: skip
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipworks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what static analysis sees: the same names, eagerly
    from .checkpoints.export import save_pretrained
    from .checkpoints.io import CheckpointError
    from .config import (
        CLIPConfig, ConvNeXtConfig, PreprocessConfig, ResNetConfig, TextConfig, TimmVisionConfig, TokenizerConfig,
        VisionTransformerConfig,
    )  # fmt: skip
    from .compat import get_model_config
    from .factory import (
        RandomWeightsWarning, create_model, create_model_and_transforms, create_model_from_pretrained, get_tokenizer,
    )  # fmt: skip
    from .hf_tokenizer import HFTokenizer
    from .models.clip import CLIP, CLIPOutput, MissingTowerError, SigLIPOutput
    from .models.quant import quantize_int8
    from .models.timm_tower import reparameterize
    from .presets import get_preset, list_models
    from .pretrained import PretrainedEntry, get_pretrained, list_pretrained
    from .tokenizer import TextTokenizer, TokenizedText, Tokenizer, decode, default_tokenizer, tokenize
