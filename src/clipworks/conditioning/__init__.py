"""Text conditioning for diffusion models: CLIP skip by name, SD 1.x and SDXL encoders, long and weighted
prompts, CLIP guidance. Outputs match diffusers' `encode_prompt` (see docs/conditioning.md)."""

from .chunks import Chunk, FramedChunks, apply_weights, frame_chunks, split_chunks
from .encoders import (
    build_text_encoder,
    convert_text_from_transformers,
    load_text_encoder,
    text_config_from_transformers,
    text_encoder_from_transformers,
)
from .guidance import CLIPGuidance, image_features, preprocess_pixels, spherical_distance
from .pipelines import Conditioning, PromptReader, SDXLConditioning, SDXLText, StableDiffusionText, encode_chunks
from .skip import ClipSkip, TextStates, encode_hidden, encode_prompt
from .syntax import BREAK, Segment, parse_prompt, plain_prompt

__all__ = [
    "BREAK", "CLIPGuidance", "Chunk", "ClipSkip", "Conditioning", "FramedChunks", "PromptReader",
    "SDXLConditioning", "SDXLText", "Segment", "StableDiffusionText", "TextStates", "apply_weights",
    "build_text_encoder", "convert_text_from_transformers", "encode_chunks", "encode_hidden", "encode_prompt",
    "frame_chunks", "image_features", "load_text_encoder", "parse_prompt", "plain_prompt", "preprocess_pixels",
    "spherical_distance", "split_chunks", "text_config_from_transformers", "text_encoder_from_transformers",
]  # fmt: skip
