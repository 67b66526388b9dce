"""Parity at full size: OpenCLIP's own model of a preset (random weights), converted into clipworks.

The reduced-size parity tests check every key map and variant flag; these check what only the real sizes show
(floored patch grids, position tables, vocabularies, widths that differ between towers). The big models are marked
`slow` and run with `pytest -m slow`; CI runs ViT-B-16-SigLIP, ViT-B-16-SigLIP2, PE-Core-T-16-384 and
MobileCLIP-S1.
"""

import pytest
import torch

import clipworks
from clipworks.checkpoints.open_clip import convert_from_open_clip
from reference import open_clip_full_model, perturb_

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("transformers")  # the configs of the Hugging Face text towers OpenCLIP builds

SLOW = pytest.mark.slow
MODELS = [
    "ViT-B-16-SigLIP",
    "ViT-B-16-SigLIP2",
    pytest.param("ViT-SO400M-14-SigLIP-384", marks=SLOW),  # 384 / 14: a floored 27x27 grid; 37 s, 4.6 GB here
    pytest.param("ViT-SO400M-16-SigLIP-i18n-256", marks=SLOW),  # text without projection, tanh-GELU image tower
    pytest.param("ViT-gopt-16-SigLIP2-256", marks=SLOW),  # text width 1152 projected to 1536; 47 s, 8.4 GB here
    pytest.param("ViT-L-14-worldwide", marks=SLOW),  # MetaCLIP 2: mT5's 250,100-token vocabulary, pooled at </s>
    pytest.param("xlm-roberta-base-ViT-B-32", marks=SLOW),  # XLM-R text tower, mean-pooled, MLP projection
    pytest.param("nllb-clip-base", marks=SLOW),  # NLLB-600M's encoder, first-token pooled, linear projection
    pytest.param("mt5-base-ViT-B-32", marks=SLOW),  # mT5's encoder: relative positions, gated GELU
    pytest.param("convnext_large_d", marks=SLOW),  # ConvNeXt-L with the MLP head (timm_proj="mlp")
    pytest.param("ViT-L-14-CLIPA", marks=SLOW),  # patch-average pooling, LayerNorm after the pool, no ln_pre
    pytest.param("coca_ViT-B-32", marks=SLOW),  # attentional pool, appended class embedding, the caption decoder
    # timm image towers: timm builds both models' trunks, so these check the head, the text tower and the sizes
    "PE-Core-T-16-384",  # RoPE ViT with an attention-pool head; text over 32 positions
    "MobileCLIP-S1",  # FastViT MCi (BatchNorm branches), bidirectional text
    pytest.param("MobileCLIP2-S4", marks=SLOW),  # five-stage FastViT MCi4 at 256px
    pytest.param("MobileCLIP-B", marks=SLOW),  # the MCi ViT, causal text
    pytest.param("EVA02-B-16", marks=SLOW),  # EVA-02: RoPE, SwiGLU
    pytest.param("EVA01-g-14", marks=SLOW),  # EVA-01 giant: its key bias is a computed buffer
    pytest.param("ViTamin-L-384", marks=SLOW),  # conv stem, linear head
    pytest.param("PE-Core-bigG-14-448", marks=SLOW),  # no class token, text over 72 positions
]


def _tokens(t, rows: int = 3) -> torch.Tensor:
    """Ids laid out as the tokenizers lay them out: text, the end token, padding; a full-length row too."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.full((rows, t.context_length), t.pad_id)
    for row, n in enumerate([4, t.context_length - 1, 11][:rows]):
        tokens[row, :n] = torch.randint(3, t.vocab_size, (n,), generator=g)
        tokens[row, n] = getattr(t, "eos_id", 2)  # XLM-R and NLLB end with </s> = 2; for mT5 any non-pad id serves
    return tokens


@pytest.mark.parametrize("name", MODELS)
def test_full_size_outputs_match_open_clip(name, tmp_path):
    torch.manual_seed(0)
    ref = open_clip_full_model(name)
    perturb_(ref, std=0.02)
    cfg = clipworks.get_preset(name)
    with torch.device("meta"):
        ours = clipworks.CLIP(cfg)
    ours.load_state_dict(convert_from_open_clip(ref.state_dict(), cfg), assign=True)
    ours.eval()
    side = cfg.vision.image_size
    images = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    tokens = _tokens(cfg.text)
    with torch.inference_mode():
        image_diff = ours.encode_image(images, normalize=True) - ref.encode_image(images, normalize=True)
        text_diff = ours.encode_text(tokens, normalize=True) - ref.encode_text(tokens, normalize=True)
        if cfg.decoder is not None:  # CoCa: the caption logits too, relative to their scale
            pairs = tokens[: len(images)]  # one text per image
            theirs = ref(images, pairs, output_labels=False)["logits"]
            logits_diff = (ours.caption_logits(images, pairs) - theirs).abs().max() / theirs.abs().max()
            assert logits_diff <= 1e-5, logits_diff
    assert image_diff.abs().max() <= 1e-5 and text_diff.abs().max() <= 1e-5
