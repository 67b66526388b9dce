"""The pretrained-weights registry: which hub file holds each (model, tag) release and how its images were prepared."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from .config import OPENAI_MEAN, OPENAI_STD, PreprocessConfig
from .presets import PRESETS, get_preset

QUICKGELU = "-quickgelu"
SAFE_WEIGHTS = "open_clip_model.safetensors"
PICKLED_WEIGHTS = "open_clip_pytorch_model.bin"


@dataclass(frozen=True)
class PretrainedEntry:
    """One released set of weights for a preset.

    Attributes:
        model: the preset name it is registered under (`clipworks.list_models()`).
        tag: OpenCLIP's name for the release (e.g. "openai", "laion2b_s34b_b79k").
        hf_hub: the Hugging Face hub repository id holding the weights.
        filename: the weights file in that repository (OpenAI/OpenCLIP key layout).
        preprocess: the image preprocessing the weights were trained with.
        sha256: the published SHA-256 of `filename`, when there is one. Without it a download is checked against
            the hub's own LFS SHA-256 of the file.
        quick_gelu: the weights were trained with QuickGELU (OpenAI's activation); `preset` names the variant.
        fallback_filename: fetched when the repository has no `filename` (older repos only hold pickled weights,
            which are read with `torch.load(weights_only=True)`); checked against the hub's LFS SHA-256 only.
        revision: a pinned branch, tag or commit of the repository; None follows "main".
        license: the weights' licence as the release states it, when known.
        notes: provenance and caveats.
    """

    model: str
    tag: str
    hf_hub: str
    filename: str
    preprocess: PreprocessConfig
    sha256: str | None = None
    quick_gelu: bool = False
    fallback_filename: str | None = PICKLED_WEIGHTS
    revision: str | None = None
    license: str | None = None
    notes: str = ""

    @property
    def preset(self) -> str:
        """The preset whose architecture the weights fit: the QuickGELU variant when `quick_gelu`."""
        if self.quick_gelu and not self.model.endswith(QUICKGELU):
            return self.model + QUICKGELU
        return self.model


# Image statistics. OpenAI's are the default; several LAION releases were trained on [-1, 1] inputs.
_HALF = (0.5, 0.5, 0.5)
_OPENAI_PP = dict(mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic", resize_mode="shortest")
_HALF_PP = dict(_OPENAI_PP, mean=_HALF, std=_HALF)
_SQUASH_PP = dict(_OPENAI_PP, resize_mode="squash")
# CLIPA (UCSC-VLAA) was trained on ImageNet statistics, squashed with bilinear resizing
_CLIPA_PP = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear", resize_mode="squash")  # Apple's DFN-5B resizes both sides, ignoring aspect ratio
_SIGLIP_PP = dict(mean=_HALF, std=_HALF, interpolation="bicubic", resize_mode="squash")

_MIT, _NC, _APACHE = "mit", "cc-by-nc-4.0", "apache-2.0"
# SigLIP and SigLIP 2 models timm hosts under their OpenCLIP names (each repository also holds the tokenizer files).
_SIGLIP_RELEASES = [
    "ViT-B-16-SigLIP", "ViT-B-16-SigLIP-256", "ViT-B-16-SigLIP-384", "ViT-B-16-SigLIP-512", "ViT-B-16-SigLIP-i18n-256",
    "ViT-L-16-SigLIP-256", "ViT-L-16-SigLIP-384", "ViT-SO400M-14-SigLIP", "ViT-SO400M-14-SigLIP-384",
    "ViT-SO400M-16-SigLIP-i18n-256", "ViT-B-32-SigLIP2-256", "ViT-B-16-SigLIP2", "ViT-B-16-SigLIP2-256",
    "ViT-B-16-SigLIP2-384", "ViT-B-16-SigLIP2-512", "ViT-L-16-SigLIP2-256", "ViT-L-16-SigLIP2-384",
    "ViT-L-16-SigLIP2-512", "ViT-SO400M-14-SigLIP2", "ViT-SO400M-14-SigLIP2-378", "ViT-SO400M-16-SigLIP2-256",
    "ViT-SO400M-16-SigLIP2-384", "ViT-SO400M-16-SigLIP2-512", "ViT-gopt-16-SigLIP2-256", "ViT-gopt-16-SigLIP2-384",
]  # fmt: skip

# SHA-256 of OpenAI's original TorchScript files, as their release URLs state them. The hub copies are
# re-serialised state dicts, so these cannot check a hub download; they are kept as provenance.
_OPENAI_TORCHSCRIPT_SHA256 = {
    "RN50": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
    "RN101": "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
    "RN50x4": "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
    "RN50x16": "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa",
    "RN50x64": "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c",
    "ViT-B-32": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    "ViT-B-16": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    "ViT-L-14": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
    "ViT-L-14-336": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
}
# timm hosts OpenAI's weights converted to OpenCLIP's layout, one repository per model.
_OPENAI_REPOS = {
    "RN50": "timm/resnet50_clip.openai",
    "RN101": "timm/resnet101_clip.openai",
    "RN50x4": "timm/resnet50x4_clip.openai",
    "RN50x16": "timm/resnet50x16_clip.openai",
    "RN50x64": "timm/resnet50x64_clip.openai",
    "ViT-B-32": "timm/vit_base_patch32_clip_224.openai",
    "ViT-B-16": "timm/vit_base_patch16_clip_224.openai",
    "ViT-L-14": "timm/vit_large_patch14_clip_224.openai",
    "ViT-L-14-336": "timm/vit_large_patch14_clip_336.openai",
}


def _clean_tag(tag: str) -> str:
    # OpenCLIP accepts "LAION2B-s34B-b79K" for "laion2b_s34b_b79k"; so do we.
    return tag.strip().lower().replace("-", "_")


def _commonpool(prefix: str, pool: str, run: str, kinds=("clip", "laion", "image", "text", "basic")) -> dict:
    """DataComp's CommonPool baselines: one release per filtering method, plus the unfiltered pool."""
    names = {f"{pool}.{k}": f"{pool.lower()}_{k}" for k in kinds} | {pool: pool.lower()}
    return {f"commonpool_{t}_{_clean_tag(run)}": (f"{prefix}-CommonPool.{n}-{run}", {}, _MIT) for n, t in names.items()}


_Q = {"quick_gelu": True}
_B32, _B16, _L14 = "laion/CLIP-ViT-B-32", "laion/CLIP-ViT-B-16", "laion/CLIP-ViT-L-14"

# model -> tag -> (hub repository, entry options, licence). OpenAI's releases are added below from the tables above.
_RELEASES: dict[str, dict[str, tuple[str, dict, str | None]]] = {
    "RN50": {
        "yfcc15m": ("timm/resnet50_clip.yfcc15m", _Q, _MIT),
        "cc12m": ("timm/resnet50_clip.cc12m", _Q, _MIT),
    },
    "RN101": {"yfcc15m": ("timm/resnet101_clip.yfcc15m", _Q, _MIT)},
    "ViT-B-32": {
        "laion400m_e31": ("timm/vit_base_patch32_clip_224.laion400m_e31", _Q, _MIT),
        "laion400m_e32": ("timm/vit_base_patch32_clip_224.laion400m_e32", _Q, _MIT),
        "laion2b_e16": ("timm/vit_base_patch32_clip_224.laion2b_e16", {}, _MIT),
        "laion2b_s34b_b79k": (f"{_B32}-laion2B-s34B-b79K", {}, _MIT),
        "datacomp_xl_s13b_b90k": (f"{_B32}-DataComp.XL-s13B-b90K", {}, _MIT),
        "datacomp_m_s128m_b4k": (f"{_B32}-DataComp.M-s128M-b4K", {}, _MIT),
        **_commonpool(_B32, "M", "s128M-b4K"),
        "datacomp_s_s13m_b4k": (f"{_B32}-DataComp.S-s13M-b4K", {}, _MIT),
        **_commonpool(_B32, "S", "s13M-b4K"),
        "metaclip_400m": ("timm/vit_base_patch32_clip_224.metaclip_400m", _Q, _NC),
        "metaclip_fullcc": ("timm/vit_base_patch32_clip_224.metaclip_2pt5b", _Q, _NC),
    },
    "ViT-B-32-256": {"datacomp_s34b_b86k": (f"{_B32}-256x256-DataComp-s34B-b86K", {}, _MIT)},
    "ViT-B-16": {
        "laion400m_e31": ("timm/vit_base_patch16_clip_224.laion400m_e31", {}, _MIT),
        "laion400m_e32": ("timm/vit_base_patch16_clip_224.laion400m_e32", {}, _MIT),
        "laion2b_s34b_b88k": (f"{_B16}-laion2B-s34B-b88K", {}, _MIT),
        "datacomp_xl_s13b_b90k": (f"{_B16}-DataComp.XL-s13B-b90K", {}, _MIT),
        "datacomp_l_s1b_b8k": (f"{_B16}-DataComp.L-s1B-b8K", {}, _MIT),
        **_commonpool(_B16, "L", "s1B-b8K"),
        "dfn2b": ("apple/DFN2B-CLIP-ViT-B-16", _Q, None),
        "metaclip_400m": ("timm/vit_base_patch16_clip_224.metaclip_400m", _Q, _NC),
        "metaclip_fullcc": ("timm/vit_base_patch16_clip_224.metaclip_2pt5b", _Q, _NC),
    },
    "ViT-L-14": {
        "laion400m_e31": ("timm/vit_large_patch14_clip_224.laion400m_e31", {}, _MIT),
        "laion400m_e32": ("timm/vit_large_patch14_clip_224.laion400m_e32", {}, _MIT),
        "laion2b_s32b_b82k": (f"{_L14}-laion2B-s32B-b82K", _HALF_PP, _MIT),
        "datacomp_xl_s13b_b90k": (f"{_L14}-DataComp.XL-s13B-b90K", {}, _MIT),
        **_commonpool(_L14, "XL", "s13B-b90K", kinds=("clip", "laion")),
        "metaclip_400m": ("timm/vit_large_patch14_clip_224.metaclip_400m", _Q, _NC),
        "metaclip_fullcc": ("timm/vit_large_patch14_clip_224.metaclip_2pt5b", _Q, _NC),
        "dfn2b": ("apple/DFN2B-CLIP-ViT-L-14", _Q, None),
        "dfn2b_s39b": ("apple/DFN2B-CLIP-ViT-L-14-39B", {}, None),
    },
    "ViT-H-14": {
        "laion2b_s32b_b79k": ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", {}, _MIT),
        "metaclip_fullcc": ("timm/vit_huge_patch14_clip_224.metaclip_2pt5b", _Q, _NC),
        "metaclip_altogether": ("timm/vit_huge_patch14_clip_224.metaclip_altogether", {}, _NC),
        "dfn5b": ("apple/DFN5B-CLIP-ViT-H-14", {**_Q, **_SQUASH_PP}, None),
    },
    "ViT-g-14": {
        "laion2b_s12b_b42k": ("laion/CLIP-ViT-g-14-laion2B-s12B-b42K", {}, _MIT),
        "laion2b_s34b_b88k": ("laion/CLIP-ViT-g-14-laion2B-s34B-b88K", {}, _MIT),
    },
    "ViT-bigG-14": {
        "laion2b_s39b_b160k": ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", {}, _MIT),
        "metaclip_fullcc": ("timm/vit_gigantic_patch14_clip_224.metaclip_2pt5b", _Q, _NC),
    },
    # OpenCLIP's table points both B-16-plus-240 tags at the e31 repository; so does this one
    "ViT-B-16-plus-240": {
        "laion400m_e31": ("timm/vit_base_patch16_plus_clip_240.laion400m_e31", {}, _MIT),
        "laion400m_e32": ("timm/vit_base_patch16_plus_clip_240.laion400m_e31", {}, _MIT),
    },
    "ViT-H-14-378": {"dfn5b": ("apple/DFN5B-CLIP-ViT-H-14-378", {**_Q, **_SQUASH_PP}, None)},
    "convnext_base": {"laion400m_s13b_b51k": ("laion/CLIP-convnext_base-laion400M-s13B-b51K", {}, _MIT)},
    **{name: {"datacomp1b": (f"UCSC-VLAA/{name}-datacomp1B", _CLIPA_PP, None)}
       for name in ("ViT-L-14-CLIPA", "ViT-L-14-CLIPA-336", "ViT-H-14-CLIPA", "ViT-bigG-14-CLIPA",
                    "ViT-bigG-14-CLIPA-336")},
    "ViT-H-14-CLIPA-336": {
        "datacomp1b": ("UCSC-VLAA/ViT-H-14-CLIPA-336-datacomp1B", _CLIPA_PP, None),
        "laion2b": ("UCSC-VLAA/ViT-H-14-CLIPA-336-laion2B", _CLIPA_PP, None),
    },
    "convnext_large_d": {
        "laion2b_s26b_b102k_augreg": ("laion/CLIP-convnext_large_d.laion2B-s26B-b102K-augreg", {}, _MIT),
    },
    "convnext_large_d_320": {
        "laion2b_s29b_b131k_ft": ("laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft", {}, _MIT),
        "laion2b_s29b_b131k_ft_soup": ("laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup", {}, _MIT),
    },
    "convnext_xxlarge": {
        tag: (f"laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-{suffix}", {}, _MIT)
        for tag, suffix in (("laion2b_s34b_b82k_augreg", "augreg"), ("laion2b_s34b_b82k_augreg_rewind", "augreg-rewind"),
                            ("laion2b_s34b_b82k_augreg_soup", "augreg-soup"))
    },
    "convnext_base_w": {
        "laion2b_s13b_b82k": ("laion/CLIP-convnext_base_w-laion2B-s13B-b82K", {}, _MIT),
        "laion2b_s13b_b82k_augreg": ("laion/CLIP-convnext_base_w-laion2B-s13B-b82K-augreg", {}, _MIT),
        "laion_aesthetic_s13b_b82k": ("laion/CLIP-convnext_base_w-laion_aesthetic-s13B-b82K", {}, _MIT),
    },
    "convnext_base_w_320": {
        "laion_aesthetic_s13b_b82k": ("laion/CLIP-convnext_base_w_320-laion_aesthetic-s13B-b82K", {}, _MIT),
        "laion_aesthetic_s13b_b82k_augreg": (
            "laion/CLIP-convnext_base_w_320-laion_aesthetic-s13B-b82K-augreg", {}, _MIT
        ),
    },
    # timm's SigLIP / SigLIP 2 releases (WebLI), one repository per model; SO400M/14 at 378px reads the 384px weights
    # (both have a 27x27 patch grid)
    **{name: {"webli": (f"timm/{name}", _SIGLIP_PP, _APACHE)} for name in _SIGLIP_RELEASES},
    "ViT-SO400M-14-SigLIP-378": {"webli": ("timm/ViT-SO400M-14-SigLIP-384", _SIGLIP_PP, _APACHE)},
    # MetaCLIP 2 "worldwide" (Meta; CC-BY-NC 4.0); the H/14 224px release was trained with QuickGELU
    "ViT-H-14-worldwide": {"metaclip2_worldwide": ("timm/vit_huge_patch14_clip_224.metaclip2_worldwide", _Q, _NC)},
    "ViT-H-14-worldwide-378": {
        "metaclip2_worldwide": ("timm/vit_huge_patch14_clip_378.metaclip2_worldwide", _SQUASH_PP, _NC)
    },
    "ViT-bigG-14-worldwide": {
        "metaclip2_worldwide": ("timm/vit_gigantic_patch14_clip_224.metaclip2_worldwide", {}, _NC)
    },
    "ViT-bigG-14-worldwide-378": {
        "metaclip2_worldwide": ("timm/vit_gigantic_patch14_clip_378.metaclip2_worldwide", _SQUASH_PP, _NC)
    },
    # Hugging Face text towers: LAION's RoBERTa / XLM-RoBERTa CLIPs (the H/14 one trained with the text tower frozen)
    # and NLLB-CLIP (Visheratin 2023; NLLB's weights are CC-BY-NC 4.0), whose SigLIP variants have an "mrl" release
    # (Matryoshka representation learning)
    "roberta-ViT-B-32": {"laion2b_s12b_b32k": ("laion/CLIP-ViT-B-32-roberta-base-laion2B-s12B-b32k", {}, _MIT)},
    "xlm-roberta-base-ViT-B-32": {
        "laion5b_s13b_b90k": ("laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k", {}, _MIT)
    },
    "xlm-roberta-large-ViT-H-14": {
        "frozen_laion5b_s13b_b90k": ("laion/CLIP-ViT-H-14-frozen-xlm-roberta-large-laion5B-s13B-b90k", {}, _MIT)
    },
    "nllb-clip-base": {"v1": ("visheratin/nllb-clip-base-oc", {}, _NC)},
    "nllb-clip-large": {"v1": ("visheratin/nllb-clip-large-oc", {}, _NC)},
    "nllb-clip-base-siglip": {
        "v1": ("visheratin/nllb-clip-base-siglip", _SIGLIP_PP, _NC),
        "mrl": ("visheratin/nllb-siglip-mrl-base", _SIGLIP_PP, _NC),
    },
    "nllb-clip-large-siglip": {
        "v1": ("visheratin/nllb-clip-large-siglip", _SIGLIP_PP, _NC),
        "mrl": ("visheratin/nllb-siglip-mrl-large", _SIGLIP_PP, _NC),
    },
    # --- CoCa (LAION): the LAION-2B models and their MS-COCO caption fine-tunes ---
    **{model: {"laion2b_s13b_b90k": (f"laion/CoCa-{arch}-laion2B-s13B-b90k", {}, _MIT),
               "mscoco_finetuned_laion2b_s13b_b90k": (f"laion/mscoco_finetuned_CoCa-{arch}-laion2B-s13B-b90k", {}, _MIT)}
       for model, arch in (("coca_ViT-B-32", "ViT-B-32"), ("coca_ViT-L-14", "ViT-L-14"))},
    # --- end of CoCa ---
}


# --- timm image towers by name: EVA-CLIP, PE-Core, ViTamin, MobileCLIP ---

# MobileCLIP (Apple) feeds [0, 1] pixels, resized bilinearly; MobileCLIP 2's S3/S4/L-14 use OpenAI's statistics.
_MOBILECLIP_PP = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear", resize_mode="shortest")
_MOBILECLIP2_PP = dict(_OPENAI_PP, interpolation="bilinear")
# PE-Core (Meta) squashes to [-1, 1] bilinearly
_PE_PP = dict(mean=_HALF, std=_HALF, interpolation="bilinear", resize_mode="squash")
# ViTamin's repositories hold OpenCLIP state dicts under transformers' file name, pickled only
_VITAMIN = {"filename": "pytorch_model.bin", "fallback_filename": None}
# Licences are left unknown (None) here: the releases state them on their hub pages.
_TIMM_RELEASES: dict[str, dict[str, tuple[str, dict, str | None]]] = {
    "EVA01-g-14": {"laion400m_s11b_b41k": ("timm/eva_giant_patch14_clip_224.laion400m_s11b_b41k", {}, None)},
    "EVA01-g-14-plus": {"merged2b_s11b_b114k": ("timm/eva_giant_patch14_plus_clip_224.merged2b_s11b_b114k", {}, None)},
    "EVA02-B-16": {"merged2b_s8b_b131k": ("timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k", {}, None)},
    "EVA02-L-14": {"merged2b_s4b_b131k": ("timm/eva02_large_patch14_clip_224.merged2b_s4b_b131k", {}, None)},
    "EVA02-L-14-336": {"merged2b_s6b_b61k": ("timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k", {}, None)},
    "EVA02-E-14": {"laion2b_s4b_b115k": ("timm/eva02_enormous_patch14_clip_224.laion2b_s4b_b115k", {}, None)},
    "EVA02-E-14-plus": {"laion2b_s9b_b144k": ("timm/eva02_enormous_patch14_plus_clip_224.laion2b_s9b_b144k", {}, None)},
    **{name: {"meta": (f"timm/{name}", _PE_PP, None)}
       for name in ("PE-Core-T-16-384", "PE-Core-S-16-384", "PE-Core-B-16", "PE-Core-L-14-336", "PE-Core-bigG-14-448")},
    **{name: {"datacomp1b": (f"jienengchen/{repo}", _VITAMIN, None)}
       for name, repo in (("ViTamin-S", "ViTamin-S"), ("ViTamin-S-LTT", "ViTamin-S-LTT"), ("ViTamin-B", "ViTamin-B"),
                          ("ViTamin-B-LTT", "ViTamin-B-LTT"), ("ViTamin-L", "ViTamin-L-224px"),
                          ("ViTamin-L-256", "ViTamin-L-256px"), ("ViTamin-L-336", "ViTamin-L-336px"),
                          ("ViTamin-L-384", "ViTamin-L-384px"), ("ViTamin-L2", "ViTamin-L2-224px"),
                          ("ViTamin-L2-256", "ViTamin-L2-256px"), ("ViTamin-L2-336", "ViTamin-L2-336px"),
                          ("ViTamin-L2-384", "ViTamin-L2-384px"), ("ViTamin-XL-256", "ViTamin-XL-256px"),
                          ("ViTamin-XL-336", "ViTamin-XL-336px"), ("ViTamin-XL-384", "ViTamin-XL-384px"))},
    **{name: {"datacompdr": (f"apple/{name}-OpenCLIP", _MOBILECLIP_PP, None)}
       for name in ("MobileCLIP-S1", "MobileCLIP-S2")},
    "MobileCLIP-B": {
        "datacompdr": ("apple/MobileCLIP-B-OpenCLIP", _MOBILECLIP_PP, None),
        "datacompdr_lt": ("apple/MobileCLIP-B-LT-OpenCLIP", _MOBILECLIP_PP, None),
    },
    **{name: {"dfndr2b": (f"timm/{name}-OpenCLIP", _MOBILECLIP_PP, None)}
       for name in ("MobileCLIP2-B", "MobileCLIP2-S0", "MobileCLIP2-S2")},
    **{name: {"dfndr2b": (f"timm/{name}-OpenCLIP", _MOBILECLIP2_PP, None)}
       for name in ("MobileCLIP2-S3", "MobileCLIP2-S4")},
    "MobileCLIP2-L-14": {"dfndr2b": ("timm/MobileCLIP2-L-14-OpenCLIP", _OPENAI_PP, None)},
}  # fmt: skip
_RELEASES.update(_TIMM_RELEASES)

# --- end of the timm image towers ---


def _entry(model: str, tag: str, repo: str, options: dict, license: str | None) -> PretrainedEntry:
    options = dict(options)
    pp = {k: options.pop(k) for k in ("mean", "std", "interpolation", "resize_mode") if k in options}
    preprocess = PreprocessConfig(image_size=get_preset(model).vision.image_size, **{**_OPENAI_PP, **pp})
    filename = options.pop("filename", SAFE_WEIGHTS)  # a release whose repository names its own weights file
    return PretrainedEntry(model, tag, repo, filename, preprocess, license=license, **options)


def _build() -> dict[tuple[str, str], PretrainedEntry]:
    releases = {model: dict(tags) for model, tags in _RELEASES.items()}
    for model, repo in _OPENAI_REPOS.items():
        note = f"OpenAI's release; its original TorchScript file has SHA-256 {_OPENAI_TORCHSCRIPT_SHA256[model]}"
        releases.setdefault(model, {})["openai"] = (repo, {**_Q, "notes": note}, _MIT)
    entries = {}
    for model, tags in releases.items():
        for tag, (repo, options, license) in tags.items():
            entries[model, tag] = _entry(model, tag, repo, options, license)
            # QuickGELU weights are also listed under the "-quickgelu" preset, as OpenCLIP lists them.
            if options.get("quick_gelu") and model + QUICKGELU in PRESETS:
                entries[model + QUICKGELU, tag] = _entry(model + QUICKGELU, tag, repo, options, license)
    return entries


_ENTRIES: dict[tuple[str, str], PretrainedEntry] = _build()


def list_pretrained(model: str | None = None, *, as_str: bool = False) -> list[tuple[str, str]] | list[str]:
    """Sorted (model, tag) pairs of every registered release, or of one model's releases; with `as_str`,
    "model:tag" strings (OpenCLIP's `list_pretrained(as_str=True)`, whose only argument is `as_str`: a bool
    passed first is read as it).

    Raises:
        ValueError: `model` is not a preset name; the message lists the closest names.
    """
    if isinstance(model, bool):  # OpenCLIP's positional as_str
        model, as_str = None, model
    if model is not None:
        get_preset(model)  # an unknown name is an error, not an empty list
    pairs = sorted(key for key in _ENTRIES if model is None or key[0] == model)
    return [f"{m}:{t}" for m, t in pairs] if as_str else pairs


def get_pretrained(model: str, tag: str) -> PretrainedEntry:
    """The registry entry for `model` weights released under `tag`.

    Raises:
        ValueError: the model is unknown, has no registered weights, or has no such tag; the message lists the
            model's tags (or the models that have weights).
    """
    entry = _ENTRIES.get((model, _clean_tag(tag)))
    if entry is not None:
        return entry
    get_preset(model)  # raises the preset table's close-match message for unknown names
    tags = [t for m, t in list_pretrained(model)]
    if not tags:
        with_weights = sorted({m for m, _ in _ENTRIES})
        raise ValueError(f"{model!r} has no pretrained weights registered (pass a weights file path instead); "
                         f"models with pretrained tags: {', '.join(with_weights)}")  # fmt: skip
    close = difflib.get_close_matches(_clean_tag(tag), tags, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown pretrained tag {tag!r} for {model!r}{hint} (available tags: {', '.join(tags)})")
