"""Text conditioning for diffusion models: CLIP skip by name, SD 1.x and SDXL encoders, long and weighted
prompts, CLIP guidance. Outputs match diffusers' `encode_prompt` (see docs/conditioning.md)."""

from .chunks import Chunk, FramedChunks, apply_weights, frame_chunks, split_chunks
from .compel_encode import CompelChunks, encode_compel
from .compel_syntax import CompelBlend, CompelConjunction, CompelPrompt, CompelSwap, parse_compel
from .embeddings import Embedding, TextualInversion, embedding_from_state_dict, load_embedding
from .encoders import (
    build_text_encoder,
    convert_text_from_transformers,
    load_text_encoder,
    text_config_from_transformers,
    text_encoder_from_transformers,
)
from .guidance import CLIPGuidance, image_features, preprocess_pixels, spherical_distance
from .pipelines import Conditioning, PromptReader, SDXLConditioning, SDXLText, StableDiffusionText, encode_chunks
from .sd3 import FluxConditioning, FluxText, SD3Conditioning, SD3Text, encode_t5
from .single_file import (
    SingleFileInfo,
    inspect_single_file,
    load_sdxl_text,
    load_single_file_t5_weights,
    load_single_file_text_encoders,
    load_stable_diffusion_text,
)
from .schedule import ScheduledConditioning, Weighted, parse_schedule, prompt_schedule, split_and
from .skip import ClipSkip, TextStates, encode_hidden, encode_prompt
from .syntax import BREAK, Segment, parse_prompt, plain_prompt
from .t5 import (
    T5Encoder,
    convert_t5_from_transformers,
    load_t5_encoder,
    t5_config_from_transformers,
    t5_encoder_from_transformers,
)

__all__ = [
    "CompelBlend", "CompelChunks", "CompelConjunction", "CompelPrompt", "CompelSwap", "encode_compel", "parse_compel",
    "Embedding", "TextualInversion", "embedding_from_state_dict", "load_embedding",
    "SingleFileInfo", "inspect_single_file", "load_sdxl_text", "load_single_file_t5_weights",
    "load_single_file_text_encoders", "load_stable_diffusion_text",
    "BREAK", "CLIPGuidance", "Chunk", "ClipSkip", "Conditioning", "FramedChunks", "PromptReader",
    "SDXLConditioning", "SDXLText", "ScheduledConditioning", "Weighted", "Segment", "StableDiffusionText", "TextStates", "apply_weights",
    "build_text_encoder", "convert_text_from_transformers", "encode_chunks", "encode_hidden", "encode_prompt",
    "frame_chunks", "image_features", "load_text_encoder", "parse_prompt", "parse_schedule", "plain_prompt", "preprocess_pixels", "prompt_schedule",
    "spherical_distance", "split_and", "split_chunks", "text_config_from_transformers", "text_encoder_from_transformers",
    "FluxConditioning", "FluxText", "SD3Conditioning", "SD3Text", "T5Encoder", "convert_t5_from_transformers",
    "encode_t5", "load_t5_encoder", "t5_config_from_transformers", "t5_encoder_from_transformers",
]  # fmt: skip
