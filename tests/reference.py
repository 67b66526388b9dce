"""Test helpers: tiny configs of every preset and reduced-size reference (OpenCLIP) models."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from clipworks.config import CLIPConfig


def tiny_config(cfg: CLIPConfig) -> CLIPConfig:
    """The same architecture family and variant flags as `cfg`, at a size a test can run in milliseconds."""
    v = cfg.vision
    if v.kind == "vit":
        # a preset whose patch grid is floored (SO400M/14 at 384px) keeps a remainder at the tiny size too
        image = 32 + (4 if v.image_size % v.patch_size else 0)
        vision = replace(v, image_size=image, patch_size=8 if v.patch_size < 16 else 16, width=32, heads=2, layers=2)
        embed = 32 if not v.projection else 24
    elif v.kind == "resnet":
        vision = replace(v, image_size=64, layers=(1, 1, 1, 1), width=8, heads=8 * 32 // 64)
        embed = 24
    elif v.kind == "timm":
        vision = tiny_timm(v)
        embed = 24
    else:
        vision = replace(v, image_size=64, depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))
        embed = 24
    text = replace(cfg.text, width=32, heads=2, layers=2, vocab_size=min(cfg.text.vocab_size, 49408))
    if cfg.text.kind != "transformer":  # a Hugging Face encoder family: its feed-forward (and T5's head) sizes too
        text = replace(text, mlp_width=48, **({"head_width": 16} if cfg.text.kind == "t5" else {}))
    decoder = cfg.decoder
    if decoder is not None:  # CoCa: the decoder as wide as the text tower and as the image tokens it reads
        decoder = replace(decoder, width=text.width, heads=2, layers=2, vocab_size=text.vocab_size)
        if v.pool == "attentional":  # the image tokens are embed_dim wide; the pool's keys wider, as at full size
            embed, vision = text.width, replace(vision, width=48, heads=2, pool_heads=2)
    return replace(cfg, embed_dim=embed, vision=vision, text=text, decoder=decoder)


# timm image towers (EVA-CLIP, PE-Core, ViTamin, MobileCLIP): the model a preset names, shrunk through timm's own
# arguments: (timm names it applies to, model_kwargs, image side). ViTamin's conv stem and the MobileCLIP ViT's stem are
# sized inside timm's model functions, so only their depth and input shrink.
_ViT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8}
TINY_TIMM = [
    (("eva_giant_patch14_224", "eva02_base_patch16_clip_224", "eva02_large_patch14_clip_224",
      "eva02_large_patch14_clip_336", "eva02_enormous_patch14_clip_224", "vit_pe_core_tiny_patch16_384",
      "vit_pe_core_small_patch16_384", "vit_pe_core_base_patch16_224", "vit_pe_core_large_patch14_336",
      "vit_pe_core_gigantic_patch14_448", "vit_large_patch14_clip_224"), _ViT, 32),
    (tuple(f"vitamin_{s}" for s in ("small_224", "base_224", "large_224", "large_256", "large_336", "large_384",
                                    "large2_224", "large2_256", "large2_336", "large2_384", "xlarge_256",
                                    "xlarge_336", "xlarge_384")), {"depth": 1, "img_size": 64}, 64),
    (("fastvit_mci0", "fastvit_mci1", "fastvit_mci2"), {"layers": (1,) * 4, "embed_dims": (8, 16, 32, 32)}, 64),
    (("fastvit_mci3", "fastvit_mci4"), {"layers": (1,) * 5, "embed_dims": (8, 16, 32, 32, 32)}, 64),
    (("vit_base_mci_224",), {"depth": 1, "img_size": 64}, 64),
]  # fmt: skip


def tiny_timm(v):
    """The timm tower config `v` at a test's size (see TINY_TIMM)."""
    for names, kwargs, image in TINY_TIMM:
        if v.model_name in names:
            return replace(v, image_size=image, model_kwargs=tuple(kwargs.items()))
    raise KeyError(f"no tiny size for timm model {v.model_name!r}: add it to reference.TINY_TIMM")


def open_clip_full_model(name: str, device: str | None = None):
    """OpenCLIP's full-size model for a preset name, randomly initialised (on the meta device: no memory, no init cost).

    OpenCLIP reads an HF text tower's size from the hub: the named model's config is built here instead (offline).
    """
    import open_clip

    cfg = open_clip.factory.get_model_config(name)
    hf_name = cfg.get("text_cfg", {}).get("hf_model_name")
    if hf_name:
        from clipworks.checkpoints.open_clip_hf import HF_TEXT_MODELS

        cfg.pop("custom_text", False)  # OpenCLIP builds every HF text tower as a CustomTextCLIP
        cfg["text_cfg"]["hf_model_pretrained"] = False
        config = transformers_config(HF_TEXT_MODELS[hf_name], HF_MODEL_TYPES[hf_name])
        with local_hf_config(config), torch.device(device or "cpu"):
            return open_clip.model.CustomTextCLIP(**cfg).eval()
    cls = open_clip.model.CLIP if not cfg.pop("custom_text", False) else open_clip.model.CustomTextCLIP
    if "multimodal_cfg" in cfg:
        cls = open_clip.coca_model.CoCa
    with torch.device(device or "cpu"):
        return cls(**cfg).eval()


def open_clip_meta_model(name: str):
    """OpenCLIP's full-size model for a preset name, on the meta device (no memory, no init cost)."""
    return open_clip_full_model(name, device="meta")


def perturb_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """Random values in every parameter and normalisation buffer, so that no wrong key map can pass by
    accident (freshly initialised LayerNorms are all ones and zeros; BatchNorm stats are zeros and ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():  # persistent tensors only (not e.g. a causal mask)
            if not t.is_floating_point():
                continue
            if "running_var" in name:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * std + (1.0 if name.endswith("ln_1.weight") else 0.0))


def open_clip_model(cfg: CLIPConfig):
    """A randomly initialised OpenCLIP model with the architecture `cfg` describes (reduced sizes welcome).

    OpenCLIP builds ConvNeXt and SigLIP image towers through timm by model name only, so for those the
    timm trunk is swapped for one of the requested size; the wrapper, its key layout and the text tower
    remain OpenCLIP's.
    """
    import timm
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

    if cfg.decoder is not None:
        return open_clip_coca_model(cfg)
    v, t = cfg.vision, cfg.text
    quick_gelu = t.act == "quick_gelu"
    text = CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                       layers=t.layers, mlp_ratio=t.mlp_ratio, pool_type=t.pool, eos_id=t.eos_id,
                       no_causal_mask=not t.causal)  # fmt: skip
    if v.kind == "vit" and v.pool in ("cls", "avg"):  # OpenAI's ViT, and CLIPA's (patch average, no ln_pre)
        vision = CLIPVisionCfg(layers=v.layers, width=v.width, head_width=v.width // v.heads, mlp_ratio=v.mlp_ratio,
                               patch_size=v.patch_size, image_size=v.image_size, no_ln_pre=not v.ln_pre,
                               pool_type="avg" if v.pool == "avg" else "tok",
                               final_ln_after_pool=v.pool == "avg")  # fmt: skip
        return CLIP(cfg.embed_dim, vision, text, quick_gelu=quick_gelu)
    if v.kind == "resnet":
        vision = CLIPVisionCfg(layers=list(v.layers), width=v.width, image_size=v.image_size, patch_size=None)
        return CLIP(cfg.embed_dim, vision, text, quick_gelu=quick_gelu)
    if v.kind == "timm":
        return open_clip_timm_model(cfg, text)
    if v.kind == "convnext":
        vision = CLIPVisionCfg(timm_model_name="convnext_base", timm_pool="", timm_proj=v.proj_type,
                               image_size=v.image_size)  # fmt: skip
        model = CLIP(cfg.embed_dim, vision, text, quick_gelu=quick_gelu)
        model.visual.trunk = timm.create_model("convnext_base", depths=v.depths, dims=v.dims, norm_eps=v.norm_eps,
                                               num_classes=0)  # fmt: skip
        if v.proj_type == "mlp":  # OpenCLIP's head for timm_proj="mlp", sized for the shrunk trunk
            from timm.layers import Mlp

            model.visual.head.mlp = Mlp(v.dims[-1], 2 * cfg.embed_dim, cfg.embed_dim, bias=(True, False))
        else:
            model.visual.head.proj = torch.nn.Linear(v.dims[-1], cfg.embed_dim, bias=False)
        return model
    # SigLIP: timm ViT with attention-pool head, OpenCLIP's bidirectional text tower pooled at the last token
    vision = CLIPVisionCfg(timm_model_name="vit_base_patch16_siglip_224", timm_pool="map", timm_proj="none",
                           image_size=224)  # fmt: skip
    text_act = {"act_kwargs": {"approximate": "tanh"}} if t.act == "gelu_tanh" else {}
    text = CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                       layers=t.layers, mlp_ratio=t.mlp_ratio, no_causal_mask=True, proj_bias=t.proj_bias,
                       proj_type="linear" if t.projection else "none", pool_type="last",
                       norm_kwargs={"eps": t.norm_eps}, **text_act)  # fmt: skip
    model = CustomTextCLIP(cfg.embed_dim, vision, text, init_logit_bias=cfg.init_logit_bias)
    model.visual.trunk = timm.create_model(
        "vit_base_patch16_siglip_224", depth=v.layers, embed_dim=v.width, num_heads=v.heads, img_size=v.image_size,
        patch_size=v.patch_size, mlp_ratio=v.mlp_ratio, act_layer=v.act, num_classes=0, global_pool="map",
    )  # fmt: skip
    return model


def open_clip_coca_model(cfg: CLIPConfig):
    """OpenCLIP's CoCa with the architecture `cfg` describes (reduced sizes welcome), randomly initialised."""
    from open_clip.coca_model import CoCa

    v, t, d = cfg.vision, cfg.text, cfg.decoder
    pool = {"attentional_pool": True, "attn_pooler_heads": v.pool_heads, "attn_pooler_queries": v.pool_queries}
    vision = dict(image_size=v.image_size, patch_size=v.patch_size, width=v.width, layers=v.layers,
                  head_width=v.width // v.heads, mlp_ratio=v.mlp_ratio, output_tokens=True,
                  **(pool if v.pool == "attentional" else {}))  # fmt: skip
    text = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                layers=t.layers, mlp_ratio=t.mlp_ratio, embed_cls=True, pad_id=t.pad_id, output_tokens=True)  # fmt: skip
    multimodal = dict(context_length=d.context_length, width=d.width, heads=d.heads, layers=d.layers)
    return CoCa(cfg.embed_dim, multimodal, text, vision, quick_gelu=d.act == "quick_gelu")


def open_clip_timm_model(cfg: CLIPConfig, text):
    """OpenCLIP's CustomTextCLIP with its TimmModel for a timm tower config (`text`: its CLIPTextCfg), built along
    OpenCLIP's own path; the config's model_kwargs (how tests shrink the named model) are added to each
    `timm.create_model` call OpenCLIP makes, since OpenCLIP passes the name alone."""
    from unittest import mock

    import timm
    from open_clip.model import CLIPVisionCfg, CustomTextCLIP

    v = cfg.vision
    vision = CLIPVisionCfg(timm_model_name=v.model_name, timm_pool=v.pool, timm_proj=v.projection,
                           timm_proj_bias=v.proj_bias, timm_drop_path=v.drop_path, image_size=v.image_size)  # fmt: skip
    create = timm.create_model

    def create_sized(name, *args, **kwargs):
        return create(name, *args, **{**kwargs, **dict(v.model_kwargs)})

    with mock.patch.object(timm, "create_model", create_sized):
        return CustomTextCLIP(cfg.embed_dim, vision, text, quick_gelu=cfg.text.act == "quick_gelu")


# Hugging Face text towers -------------------------------------------------------------------------------------------

# transformers' model type of each text model OpenCLIP's configs name (OpenCLIP's hf_configs.arch_dict keys).
HF_MODEL_TYPES = {"roberta-base": "roberta", "xlm-roberta-base": "xlm-roberta", "xlm-roberta-large": "xlm-roberta",
                  "google/mt5-base": "mt5", "google/mt5-xl": "mt5", "facebook/nllb-200-distilled-600M": "m2m_100",
                  "facebook/nllb-200-distilled-1.3B": "m2m_100"}  # fmt: skip


def transformers_config(t, model_type: str):
    """The transformers config of the model whose encoder clipworks' Hugging Face text config `t` describes (decoders,
    where the model has one, as large as the encoder, as in mT5 and NLLB)."""
    import transformers

    if t.kind == "bert":
        cls = {"roberta": transformers.RobertaConfig, "xlm-roberta": transformers.XLMRobertaConfig}[model_type]
        return cls(vocab_size=t.vocab_size, hidden_size=t.width, num_hidden_layers=t.layers,
                   num_attention_heads=t.heads, intermediate_size=t.mlp_width, hidden_act=t.act,
                   max_position_embeddings=t.max_positions, type_vocab_size=t.type_vocab_size,
                   layer_norm_eps=t.norm_eps, pad_token_id=t.pad_id, bos_token_id=0, eos_token_id=2)  # fmt: skip
    if t.kind == "t5":
        assert model_type == "mt5", model_type
        return transformers.MT5Config(vocab_size=t.vocab_size, d_model=t.width, d_kv=t.head_width, d_ff=t.mlp_width,
                                      num_layers=t.layers, num_heads=t.heads, feed_forward_proj="gated-gelu",
                                      relative_attention_num_buckets=t.rel_buckets,
                                      relative_attention_max_distance=t.rel_max_distance,
                                      layer_norm_epsilon=t.norm_eps, pad_token_id=t.pad_id, eos_token_id=1,
                                      decoder_start_token_id=0, tie_word_embeddings=False)  # fmt: skip
    assert t.kind == "m2m100" and model_type == "m2m_100", (t.kind, model_type)
    return transformers.M2M100Config(vocab_size=t.vocab_size, d_model=t.width, encoder_layers=t.layers,
                                     decoder_layers=t.layers, encoder_attention_heads=t.heads,
                                     decoder_attention_heads=t.heads, encoder_ffn_dim=t.mlp_width,
                                     decoder_ffn_dim=t.mlp_width, activation_function=t.act,
                                     scale_embedding=t.scale_embedding, pad_token_id=t.pad_id, bos_token_id=0,
                                     eos_token_id=2, decoder_start_token_id=2)  # fmt: skip


@contextlib.contextmanager
def local_hf_config(config):
    """OpenCLIP's HFTextEncoder reads the named model's config from the hub: hand it `config` instead (offline)."""
    from unittest import mock

    import open_clip.hf_model

    with mock.patch.object(open_clip.hf_model.AutoConfig, "from_pretrained", lambda *a, **k: config):
        yield


def open_clip_hf_model(cfg: CLIPConfig, model_type: str):
    """OpenCLIP's CustomTextCLIP with an HFTextEncoder of clipworks' (reduced-size) Hugging Face text config, built
    along OpenCLIP's own path for an `hf_model_name` (the encoder alone of an encoder-decoder model, BERT's pooler
    only for cls_pooler), from a local transformers config; the image tower is `open_clip_model`'s for `cfg.vision`."""
    from open_clip.model import CustomTextCLIP

    from clipworks.config import TextConfig

    t = cfg.text
    pooler = {"mean": "mean_pooler", "cls": "cls_pooler", "first": "cls_last_hidden_state_pooler"}[t.pool]
    text_cfg = {"hf_model_name": "clipworks-test/tiny", "hf_model_pretrained": False, "hf_pooler_type": pooler,
                "hf_proj_type": {"none": None}.get(t.proj_type, t.proj_type)}  # fmt: skip
    with local_hf_config(transformers_config(t, model_type)):
        # a throwaway image tower: replaced below by OpenCLIP's tower of cfg.vision
        vision = {"image_size": 16, "patch_size": 16, "width": 8, "layers": 1, "head_width": 8}
        model = CustomTextCLIP(cfg.embed_dim, vision, text_cfg, init_logit_bias=cfg.init_logit_bias)
    act = cfg.vision.act if cfg.vision.kind == "vit" else "gelu"  # OpenCLIP's quick_gelu flag reaches the image tower
    plain_text = TextConfig(context_length=t.context_length, width=8, heads=1, layers=1, act=act)
    model.visual = open_clip_model(replace(cfg, text=plain_text)).visual
    return model


def with_changes(config: dict, **changes) -> dict:
    """`config` (a transformers config dict) with `changes` applied: "tower__field" names a field of a sub-config
    ("text_config__hidden_act"), a plain key a top-level field."""
    for key, value in changes.items():
        tower, _, field = key.partition("__")
        if field:
            config[tower][field] = value
        else:
            config[key] = value
    return config
