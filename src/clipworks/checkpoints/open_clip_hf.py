"""OpenCLIP's Hugging Face text towers (`hf_model_name`) at the boundary: configs by model name, and key maps.

OpenCLIP names these towers by a transformers model name and builds them from that model's hub config. clipworks
reads the same names through `HF_TEXT_MODELS`, the sizes in those models' config.json files, and converts the
state dict OpenCLIP holds (`text.transformer.<transformers module names>`, `text.proj.*`) to the native towers'
keys (models/hf_families.py) and back.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor

from ..config import BertTextConfig, HFTextConfig, M2M100TextConfig, T5TextConfig
from ..models.keymap import KeyMap, Rule, block_rules
from .io import CheckpointError

# The text encoders OpenCLIP's model configs name, with the sizes of their hub config.json files (transformers'
# config classes supply what a file leaves out: mT5's relative_attention_max_distance 128, M2M100's LayerNorm eps).
# The pooling here is OpenCLIP's default for the architecture (hf_configs.arch_dict: mean_pooler for RoBERTa, XLM-R and
# mT5, cls_pooler for M2M100), used when a config's hf_pooler_type is null; a model config's hf_pooler_type and
# hf_proj_type replace pooling and projection.
_ROBERTA = {"max_positions": 514, "type_vocab_size": 1, "pad_id": 1, "norm_eps": 1e-5}
HF_TEXT_MODELS: dict[str, HFTextConfig] = {
    "roberta-base": BertTextConfig(vocab_size=50265, width=768, layers=12, heads=12, mlp_width=3072, **_ROBERTA),
    "xlm-roberta-base": BertTextConfig(vocab_size=250002, width=768, layers=12, heads=12, mlp_width=3072, **_ROBERTA),
    "xlm-roberta-large": BertTextConfig(vocab_size=250002, width=1024, layers=24, heads=16, mlp_width=4096, **_ROBERTA),
    "google/mt5-base": T5TextConfig(vocab_size=250112, width=768, layers=12, heads=12, head_width=64, mlp_width=2048),
    "google/mt5-xl": T5TextConfig(vocab_size=250112, width=2048, layers=24, heads=32, head_width=64, mlp_width=5120),
    "facebook/nllb-200-distilled-600M": M2M100TextConfig(vocab_size=256206, width=1024, layers=12, heads=16,
                                                         mlp_width=4096),
    "facebook/nllb-200-distilled-1.3B": M2M100TextConfig(vocab_size=256206, width=1024, layers=24, heads=16,
                                                         mlp_width=8192),
}  # fmt: skip

# OpenCLIP's hf_pooler_type -> clipworks' pool. Its max_pooler is left out: OpenCLIP's MaxPooler cannot run (it calls
# masked_fill with the integer attention mask, which torch refuses), so no OpenCLIP model uses it.
_POOLS = {"mean_pooler": "mean", "cls_pooler": "cls", "cls_last_hidden_state_pooler": "first"}
# OpenCLIP's hf_proj_type -> clipworks' proj_type; None is its identity (when width == embed_dim).
_PROJECTIONS = {"mlp": "mlp", "linear": "linear", None: "none"}
_CONTEXT_LENGTH = 77  # OpenCLIP's text_cfg default: the tokenizer's length


def hf_text_config(name: str, pool: str | None = None, proj_type: str | None = None) -> HFTextConfig:
    """The text config of the Hugging Face model `name` (one of HF_TEXT_MODELS), with a pool and projection."""
    base = HF_TEXT_MODELS[name]
    return replace(base, pool=pool or base.pool, proj_type=proj_type or base.proj_type)


def text_config_from_open_clip(t: dict[str, Any]) -> HFTextConfig:
    """The native config of an OpenCLIP `text_cfg` with an `hf_model_name`.

    OpenCLIP reads only hf_model_name, hf_pooler_type, hf_proj_type and context_length (the tokenizer's) for these
    towers; the transformer sizes come from the named model, so other size keys are ignored as OpenCLIP ignores them.

    Raises:
        CheckpointError: an unknown model name, pooler or projection, naming the field, its value and what is supported.
    """
    name = t["hf_model_name"]
    if name not in HF_TEXT_MODELS:
        raise CheckpointError(f"text_cfg.hf_model_name={name!r} is not supported; clipworks runs the text towers of "
                              f"{sorted(HF_TEXT_MODELS)}")  # fmt: skip
    pooler = t.get("hf_pooler_type", "mean_pooler")
    if pooler is None:  # OpenCLIP then takes the architecture's default (hf_configs.arch_dict): the family default here
        pooler = next(k for k, v in _POOLS.items() if v == HF_TEXT_MODELS[name].pool)
    if pooler not in _POOLS:
        why = " (OpenCLIP's MaxPooler cannot run)" if pooler == "max_pooler" else ""
        raise CheckpointError(f"text_cfg.hf_pooler_type={pooler!r} is not supported{why}; expected one of "
                              f"{list(_POOLS)}")  # fmt: skip
    proj = t.get("hf_proj_type", "mlp")
    if proj not in _PROJECTIONS:
        raise CheckpointError(f"text_cfg.hf_proj_type={proj!r} is not supported; expected one of {list(_PROJECTIONS)}")
    cfg = hf_text_config(name, _POOLS[pooler], _PROJECTIONS[proj])
    return replace(cfg, context_length=t.get("context_length", _CONTEXT_LENGTH))


def hf_model_name(t: HFTextConfig) -> str:
    """The Hugging Face model whose encoder `t` is (sizes equal; pooling, projection and context length free).

    Raises:
        ValueError: no model in HF_TEXT_MODELS has these sizes (OpenCLIP names these towers by model only).
    """
    for name, base in HF_TEXT_MODELS.items():
        if replace(base, context_length=t.context_length, pool=t.pool, proj_type=t.proj_type) == t:
            return name
    raise ValueError(f"this {t.kind} text tower has the sizes of none of the Hugging Face models OpenCLIP can name "
                     f"{sorted(HF_TEXT_MODELS)}, so it cannot be written as an OpenCLIP config")  # fmt: skip


def text_config_to_open_clip(t: HFTextConfig) -> dict[str, Any]:
    """The OpenCLIP `text_cfg` keys for a native Hugging Face text tower (the tokenizer's keys are written elsewhere).

    Raises:
        ValueError: sizes no named model has (see `hf_model_name`).
    """
    d: dict[str, Any] = {"hf_model_name": hf_model_name(t)}
    if t.context_length != _CONTEXT_LENGTH:
        d["context_length"] = t.context_length
    d["hf_proj_type"] = next(k for k, v in _PROJECTIONS.items() if v == t.proj_type)
    d["hf_pooler_type"] = next(k for k, v in _POOLS.items() if v == t.pool)
    return d


# Key maps. Each family's rules name transformers' modules under OpenCLIP's `text.transformer.` (the `text.` prefix
# is stripped before these run); blocks are `{i}`-indexed.
def _weight_bias(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(f"{t}.{p}", f"{o}.{p}") for t, o in pairs for p in ("weight", "bias")]


_BERT_RULES = [
    Rule("token_embed.weight", "transformer.embeddings.word_embeddings.weight"),
    Rule("pos_embed.weight", "transformer.embeddings.position_embeddings.weight"),
    Rule("type_embed.weight", "transformer.embeddings.token_type_embeddings.weight"),
    Rule("ln_embed.weight", "transformer.embeddings.LayerNorm.weight"),
    Rule("ln_embed.bias", "transformer.embeddings.LayerNorm.bias"),
    *block_rules("transformer.encoder.layer", "blocks", _weight_bias([
        ("attention.self.query", "attn.q"), ("attention.self.key", "attn.k"), ("attention.self.value", "attn.v"),
        ("attention.output.dense", "attn.out"), ("attention.output.LayerNorm", "ln_1"),
        ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"), ("output.LayerNorm", "ln_2"),
    ])),
]  # fmt: skip
_BERT_POOLER_RULES = [Rule("pooler.weight", "transformer.pooler.dense.weight"),
                      Rule("pooler.bias", "transformer.pooler.dense.bias")]  # fmt: skip
_T5_RULES = [
    Rule("token_embed.weight", "transformer.embed_tokens.weight"),
    Rule("rel_bias.weight", "transformer.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    Rule("ln_final.weight", "transformer.final_layer_norm.weight"),
    *block_rules("transformer.block", "blocks", [
        ("layer.0.SelfAttention.q.weight", "attn.q.weight"), ("layer.0.SelfAttention.k.weight", "attn.k.weight"),
        ("layer.0.SelfAttention.v.weight", "attn.v.weight"), ("layer.0.SelfAttention.o.weight", "attn.out.weight"),
        ("layer.0.layer_norm.weight", "ln_1.weight"), ("layer.1.layer_norm.weight", "ln_2.weight"),
        ("layer.1.DenseReluDense.wi_0.weight", "mlp.gate.weight"),
        ("layer.1.DenseReluDense.wi_1.weight", "mlp.fc1.weight"), ("layer.1.DenseReluDense.wo.weight", "mlp.fc2.weight"),
    ]),
]  # fmt: skip
_M2M100_RULES = [
    Rule("token_embed.weight", "transformer.embed_tokens.weight"),
    Rule("ln_final.weight", "transformer.layer_norm.weight"),
    Rule("ln_final.bias", "transformer.layer_norm.bias"),
    *block_rules("transformer.layers", "blocks", _weight_bias([
        ("self_attn.q_proj", "attn.q"), ("self_attn.k_proj", "attn.k"), ("self_attn.v_proj", "attn.v"),
        ("self_attn.out_proj", "attn.out"), ("self_attn_layer_norm", "ln_1"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2"),
        ("final_layer_norm", "ln_2"),
    ])),
]  # fmt: skip
_FAMILY_RULES = {"bert": _BERT_RULES, "t5": _T5_RULES, "m2m100": _M2M100_RULES}
# OpenCLIP's projection: an nn.Sequential(Linear, GELU, Linear) for "mlp", an nn.Linear for "linear".
_PROJECTION_RULES = {
    "mlp": [Rule("proj.fc1.weight", "proj.0.weight"), Rule("proj.fc2.weight", "proj.2.weight")],
    "linear": [Rule("proj.weight", "proj.weight")],
    "none": [],
}
# Buffers transformers derives from the config, which checkpoints saved by older transformers hold (OpenCLIP drops
# embeddings.position_ids on load too): read and dropped, never written (today's transformers saves none of them).
_DERIVED = {
    "bert": ("transformer.embeddings.position_ids", "transformer.embeddings.token_type_ids"),
    "t5": (),
    "m2m100": ("transformer.embed_positions.weights",),
}


def keymap(t: HFTextConfig) -> KeyMap:
    """The key map between OpenCLIP's text subtree (without `text.`) and the native tower of config `t`."""
    pooler = _BERT_POOLER_RULES if t.kind == "bert" and t.pool == "cls" else []
    return KeyMap([*_FAMILY_RULES[t.kind], *pooler, *_PROJECTION_RULES[t.proj_type]])


def convert_from_open_clip(sd: dict[str, Tensor], t: HFTextConfig) -> dict[str, Tensor]:
    """OpenCLIP's text keys (without the `text.` prefix) to the native tower's.

    Raises:
        ValueError: keys no rule converts (another family's, or a pooler the config does not have), named.
    """
    derived = _DERIVED[t.kind]
    return keymap(t).to_ours({k: v for k, v in sd.items() if k not in derived})


def convert_to_open_clip(sd: dict[str, Tensor], t: HFTextConfig) -> dict[str, Tensor]:
    """The native tower's keys to OpenCLIP's text keys (without the `text.` prefix)."""
    return keymap(t).to_theirs(sd)
