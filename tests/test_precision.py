"""The precision switch: OpenCLIP's names (and auto, int8) applied once at load; fp32 where accuracy needs it;
bf16/fp16 embeddings within cosine 0.999 of fp32 for every tower family; OpenCLIP's bf16 casting; the CLI's flags."""

from __future__ import annotations

import argparse
import copy
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import clipworks
from clipworks import hardware
from clipworks.cli import UsageError, build_parser
from clipworks.models.precision import apply_precision, is_fp32_norm
from clipworks.search.commands import inference_precision, prepare_for_inference
from reference import open_clip_model, perturb_, tiny_config

# one preset per tower family: OpenAI ViT, ResNet, ConvNeXt, SigLIP (attention-pool ViT, bidirectional text), timm
# towers (EVA's ViT with RoPE; MobileCLIP's FastViT with BatchNorms), Hugging Face text towers (BERT, T5's RMSNorm,
# M2M100), CoCa
FAMILIES = ["ViT-B-32", "RN50", "convnext_base_w", "ViT-B-16-SigLIP", "EVA02-B-16", "MobileCLIP-S1",
            "xlm-roberta-base-ViT-B-32", "mt5-base-ViT-B-32", "nllb-clip-base", "coca_ViT-B-32"]  # fmt: skip
LOW = ["bf16", "fp16", "pure_bf16", "pure_fp16"]
NO_BF16 = {"fpu", "avx2", "fma"}  # Zen 3
AMX = {"avx512f", "amx_tile", "amx_bf16", "amx_int8"}


def _tiny(name: str, precision: str = "fp32", seed: int = 0):
    """The preset's tiny random model with perturbed norms (so that their weights are not bf16's exact ones and
    zeros), cast to `precision`; the same weights for the same seed."""
    cfg = tiny_config(clipworks.get_preset(name))
    torch.manual_seed(seed)
    model = clipworks.create_model(cfg, load_weights=False)
    perturb_(model, std=0.05, seed=seed)
    apply_precision(model, precision, "cpu")
    return model.eval()


def _inputs(model, n: int = 4):
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    images = torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    t = cfg.text
    tokens = torch.full((n, t.context_length), t.pad_id)
    for row, length in enumerate([5, 1, 9, t.context_length - 1][:n]):
        tokens[row, :length] = torch.randint(3, min(t.vocab_size, 1000), (length,), generator=g)
        tokens[row, length] = getattr(t, "eos_id", 2)  # an HF tokenizer's end token: any id but padding
    return images, tokens


def _features(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


# --- auto ---


@pytest.mark.parametrize("flags, expected",
                         [(NO_BF16, "fp32"), (AMX, "bf16"), ({"avx512_bf16"}, "bf16"), (set(), "fp32")])
def test_auto_follows_the_cpu_and_keeps_small_models_in_fp32(monkeypatch, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    wide, narrow = nn.Sequential(nn.Linear(128, 512), nn.Linear(512, 128)), nn.Sequential(nn.Linear(64, 256))
    assert hardware.resolve_precision("auto", "cpu") == expected
    assert hardware.resolve_precision("auto", "cpu", wide) == expected
    assert hardware.resolve_precision("auto", "cpu", narrow) == "fp32"  # too small to gain from the bf16 units
    assert hardware.model_width(wide) == 128 and hardware.model_width(narrow) == 64
    assert hardware.resolve_precision("pure_fp16", "cpu", narrow) == "pure_fp16"  # only auto is resolved


def test_auto_on_a_cpu_without_bf16_gives_fp32_models(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(NO_BF16))
    model = _tiny("ViT-B-32")
    assert apply_precision(model, "auto") == "fp32" == model.precision
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(AMX))
    wide = nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256))
    assert apply_precision(wide, "auto", "cpu") == "bf16" and wide[0].weight.dtype == torch.bfloat16


def test_auto_on_cuda_asks_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert hardware.resolve_precision("auto", "cuda") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hardware.resolve_precision("auto", "cuda", nn.Linear(8, 8)) == "bf16"  # no size rule on a GPU


# --- accuracy: every family within cosine 0.999 of fp32 ---


@pytest.mark.parametrize("name", FAMILIES)
def test_low_precision_embeddings_stay_within_cosine_0999_of_fp32(name):
    ref = _tiny(name)
    images, tokens = _inputs(ref)
    want = _features(ref, images, tokens)
    for precision in LOW:
        model = copy.deepcopy(ref)
        apply_precision(model, precision, "cpu")
        assert model.precision == precision
        got = _features(model, images, tokens)  # float32 pixels and ids in, as for fp32
        for g, w in zip(got, want):
            assert g.dtype == torch.float32 and torch.allclose(g.norm(dim=-1), torch.ones(len(g)), atol=1e-5)
            cosine = torch.cosine_similarity(g, w).min().item()
            assert cosine >= 0.999, f"{name} {precision}: cosine {cosine:.5f}"


# --- what stays fp32 ---


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50", "convnext_base_w", "ViT-B-16-SigLIP", "mt5-base-ViT-B-32"])
def test_bf16_keeps_norms_and_logit_scale_in_fp32(name):
    model = _tiny(name, "bf16")
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm2d))]
    assert norms
    for m in norms:
        assert {t.dtype for t in [*m.parameters(), *m.buffers()] if t.is_floating_point()} <= {torch.float32}, m
        assert is_fp32_norm(m) != isinstance(m, nn.BatchNorm2d)  # BatchNorm: torch's mixed kernel, as OpenCLIP
    assert model.logit_scale.dtype == torch.float32
    assert model.logit_bias is None or model.logit_bias.dtype == torch.float32
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert {m.weight.dtype for m in linears} == {torch.bfloat16}
    images, tokens = _inputs(model)
    out = model(images, tokens)
    assert out.image_features.dtype == out.text_features.dtype == out.logit_scale.dtype == torch.float32
    assert out.logits()[0].dtype == torch.float32
    with torch.no_grad():  # unnormalised features keep the towers' dtype, as in OpenCLIP
        assert model.encode_image(images).dtype == torch.bfloat16


def test_layer_norm_fp32_normalises_in_fp32():
    norm = nn.LayerNorm(64)
    perturb_(norm)
    model = nn.Sequential(nn.Linear(64, 64), norm)
    apply_precision(model, "bf16", "cpu")
    x = torch.randn(8, 64).bfloat16() * 30 + 7
    with torch.no_grad():
        want = nn.functional.layer_norm(x.float(), (64,), norm.weight, norm.bias, norm.eps)  # OpenCLIP's, unrounded
        got = norm(x)
        assert got.dtype == torch.bfloat16
        assert ((got.float() - want).abs() <= want.abs() * 2**-7).all()  # float32 arithmetic, then one bf16 rounding
        assert (got != want.bfloat16()).float().mean() <= 1e-3  # OpenCLIP's cast route, but for summation order


def test_pure_casts_everything():
    model = _tiny("ViT-B-16-SigLIP", "pure_bf16")
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    images, tokens = _inputs(model)
    assert all(f.dtype == torch.float32 for f in _features(model, images, tokens))


# --- create_model, once, errors ---


def test_create_model_takes_precision_and_agreeing_dtype():
    cfg = tiny_config(clipworks.get_preset("ViT-B-32"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = clipworks.create_model(cfg, precision="bf16", dtype=torch.bfloat16)
        assert model.precision == "bf16" and model.visual.ln_post.weight.dtype == torch.float32
        assert clipworks.create_model(cfg, precision="amp_bf16").precision == "fp32"
        pure = clipworks.create_model(cfg, dtype=torch.float16)  # dtype alone: the whole model, as before
        assert pure.precision == "pure_fp16" and pure.visual.ln_post.weight.dtype == torch.float16
        assert clipworks.create_model(cfg, precision="int8").precision == "int8"
        with pytest.raises(ValueError, match="disagree"):
            clipworks.create_model(cfg, precision="bf16", dtype=torch.float16)
        with pytest.raises(ValueError, match="disagree"):
            clipworks.create_model(cfg, precision="auto", dtype=torch.float32)
        with pytest.raises(ValueError, match="expected one of auto, fp32, bf16"):
            clipworks.create_model(cfg, precision="bfloat16")
        _, _, preprocess = clipworks.create_model_and_transforms(cfg, precision="fp16")
        assert preprocess is not None


def test_weights_are_cast_once():
    model = _tiny("ViT-B-32", "bf16")
    assert apply_precision(model, "bf16") == "bf16"  # again: nothing to do
    with pytest.raises(ValueError, match="cast to bf16 already"):
        apply_precision(model, "fp16")
    with pytest.raises(ValueError, match="CPU only"):
        apply_precision(_tiny("ViT-B-32"), "int8", device_type="cuda")


# --- OpenCLIP's bf16 ---


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_bf16_matches_open_clip_bf16(name, tmp_path):
    """clipworks' bf16 against OpenCLIP's `create_model(precision="bf16")` casting (LayerNormFp32 norms, then
    `convert_weights_to_lp`) of the same weights. Not bit-equal: the two compute attention in different orders
    (packed qkv and scaled_dot_product_attention here, nn.MultiheadAttention there; the last block's pooled row only),
    so bf16 rounds differently; measured: unnormalised features within 2 bf16 steps (max |d| 0.0078 at |x| <= 0.87
    for ViT, 0.031 at |x| <= 4.9 for RN50), normalised within 0.0037."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import convert_weights_to_lp
    from open_clip.transformer import LayerNorm, LayerNormFp32

    cfg = tiny_config(clipworks.get_preset(name))
    torch.manual_seed(0)
    ref = open_clip_model(cfg).eval()
    perturb_(ref)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    fp32 = clipworks.create_model(cfg, pretrained=tmp_path / "w.safetensors")
    ours = clipworks.create_model(cfg, pretrained=tmp_path / "w.safetensors", precision="bf16")
    for m in ref.modules():  # what OpenCLIP's create_model(precision="bf16") builds (cast_dtype -> LayerNormFp32)
        if type(m) is LayerNorm:
            m.__class__ = LayerNormFp32
    convert_weights_to_lp(ref, torch.bfloat16)
    images, tokens = _inputs(fp32)
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat", "", "A DOG on the grass", "x " * 100])
    with torch.no_grad():
        theirs = ref.encode_image(images.bfloat16()), ref.encode_text(tokens)  # OpenCLIP takes bf16 pixels
        mine = ours.encode_image(images), ours.encode_text(tokens)
        exact = _features(fp32, images, tokens)
    for t, m, e in zip(theirs, mine, exact):
        assert t.dtype == m.dtype == torch.bfloat16
        step = 2.0 ** (torch.floor(torch.log2(t.float().abs().max())) - 7)  # bf16's spacing at the largest value
        assert (t.float() - m.float()).abs().max() <= 4 * step
        t_n, m_n = nn.functional.normalize(t.float(), dim=-1), nn.functional.normalize(m.float(), dim=-1)
        assert (t_n - m_n).abs().max() <= 0.01
        # and as close to fp32 as OpenCLIP's bf16 is
        assert torch.cosine_similarity(m_n, e).min() >= torch.cosine_similarity(t_n, e).min() - 1e-4


# --- the command-line flags ---


def _args(*argv):
    return build_parser().parse_args(["embed", "--model", "ViT-B-32", "--data", "folder:x", "--out", "y", *argv])


def test_int8_flag_is_an_alias_of_precision_int8(capsys):
    args = _args("--int8")
    assert "--int8 is the old spelling of --precision int8" in capsys.readouterr().err
    assert inference_precision(args) == "int8"
    assert inference_precision(_args("--precision", "int8", "--int8")) == "int8"
    assert inference_precision(_args()) == "fp32"
    with pytest.raises(UsageError, match="--int8 is --precision int8; it cannot be given with --precision bf16"):
        inference_precision(_args("--int8", "--precision", "bf16"))


@pytest.mark.parametrize("argv", [["eval", "zeroshot", "--model", "m", "--data", "x"],
                                  ["classify", "--model", "m", "--labels", "a", "i.jpg"],
                                  ["serve", "--index", "x", "--model", "m"],
                                  ["benchmark", "--models", "m"]])  # fmt: skip
def test_every_inference_command_takes_precision(argv):
    assert build_parser().parse_args([*argv, "--precision", "pure_bf16"]).precision == "pure_bf16"
    assert build_parser().parse_args(argv).precision == "fp32"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--precision", "bfloat16"])


def test_prepare_for_inference_applies_the_precision(capsys, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(AMX))
    model = _tiny("ViT-B-32")
    assert prepare_for_inference(argparse.Namespace(precision="auto"), model) == "fp32"  # width 32: too small
    assert "--precision auto: fp32" in capsys.readouterr().err
    model = _tiny("ViT-B-32")
    assert prepare_for_inference(argparse.Namespace(precision="bf16", int8=False), model) == "bf16" == model.precision
    assert prepare_for_inference(argparse.Namespace(), _tiny("ViT-B-32")) == "fp32"  # a command without the flags
    with pytest.raises(UsageError, match="--precision int8: .*no transformer blocks"):
        prepare_for_inference(argparse.Namespace(precision="int8"), _tiny("RN50").visual)


# --- auto checks bf16 on the model's own weights ---


def _wide(seed: int = 0):
    """A tiny ViT-B-32 at width 128 (the narrowest auto casts on the CPU)."""
    from dataclasses import replace

    cfg = tiny_config(clipworks.get_preset("ViT-B-32"))
    cfg = replace(cfg, vision=replace(cfg.vision, width=128, heads=2), text=replace(cfg.text, width=128, heads=2))
    torch.manual_seed(seed)
    return clipworks.create_model(cfg, load_weights=False).eval()


def test_auto_keeps_fp32_where_bf16_moves_the_embeddings(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(AMX))
    good = _wide()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PrecisionWarning
        assert apply_precision(good, "auto") == "bf16" == good.precision
    assert good.visual.proj.weight.dtype == torch.bfloat16 and "probe cosine to fp32 0.99" in good.precision_note

    bad = _wide()
    with torch.no_grad():  # a projection whose signal lives below bf16's resolution: 1 + 1e-3 r rounds to 1
        bad.visual.proj.weight.copy_(1 + 1e-3 * torch.randn(bad.visual.proj.weight.shape))
        bad.visual.ln_post.weight.fill_(1), bad.visual.ln_post.bias.zero_()  # rows summing to 0: ones(.) x = 0
    reference = copy.deepcopy(bad)
    images, tokens = _inputs(bad)
    with pytest.warns(clipworks.models.precision.PrecisionWarning, match="kept fp32: bf16 embeddings fell to cosine"):
        assert apply_precision(bad, "auto") == "fp32" == bad.precision
    assert "kept fp32" in bad.precision_note
    # the very fp32 weights and norm classes back: features bit-identical to the untouched model's
    assert all(p.dtype == torch.float32 for p in bad.parameters()) and not any(map(is_fp32_norm, bad.modules()))
    buffers = dict(reference.named_buffers(remove_duplicate=False))
    assert {k: b.dtype for k, b in bad.named_buffers(remove_duplicate=False)} == {k: b.dtype for k, b in buffers.items()}
    for got, want in zip(_features(bad, images, tokens), _features(reference, images, tokens)):
        assert torch.equal(got, want)
    assert apply_precision(bad, "bf16") == "bf16"  # asked for by name, bf16 is applied as asked


def test_prepare_for_inference_says_when_auto_kept_fp32(monkeypatch, capsys):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(AMX))
    model = _wide()
    with torch.no_grad():
        model.visual.proj.weight.copy_(1 + 1e-3 * torch.randn(model.visual.proj.weight.shape))
        model.visual.ln_post.weight.fill_(1), model.visual.ln_post.bias.zero_()
    with pytest.warns(clipworks.models.precision.PrecisionWarning):
        assert prepare_for_inference(argparse.Namespace(precision="auto"), model) == "fp32"
    assert "--precision auto: fp32 (kept fp32: bf16 embeddings fell to cosine" in capsys.readouterr().err


@pytest.mark.parametrize("name", FAMILIES)
def test_the_auto_check_runs_on_every_family(name):
    from clipworks.models.precision import _checked_cast

    model = _tiny(name)
    images, tokens = _inputs(model)
    want = _features(model, images, tokens)
    assert _checked_cast(model, "bf16") == "bf16" == model.precision, model.precision_note
    assert model.precision_note.startswith("bf16: probe cosine to fp32 0.99")
    for got, ref in zip(_features(model, images, tokens), want):  # cast as "bf16" itself casts
        assert torch.nn.functional.cosine_similarity(got, ref).min() > 0.999


@pytest.mark.parametrize("name", ["EVA02-B-16", "RN50", "MobileCLIP-S1"])  # RoPE tables, batch-norm statistics
def test_auto_kept_fp32_puts_every_tensor_back(name, monkeypatch):
    from clipworks.models import precision
    from clipworks.models.precision import _checked_cast

    monkeypatch.setattr(precision, "AUTO_MIN_COSINE", 1.01)  # no cast can pass: the fallback runs
    model, reference = _tiny(name), _tiny(name)
    images, tokens = _inputs(model)
    with pytest.warns(precision.PrecisionWarning):
        assert _checked_cast(model, "bf16") == "fp32" == model.precision
    state, ref = model.state_dict(keep_vars=True), reference.state_dict(keep_vars=True)
    assert {k: v.dtype for k, v in state.items()} == {k: v.dtype for k, v in ref.items()}
    non_persistent = {k: b.dtype for k, b in model.named_buffers(remove_duplicate=False) if k not in state}
    assert non_persistent == {k: b.dtype for k, b in reference.named_buffers(remove_duplicate=False) if k not in ref}
    assert all(isinstance(v, nn.Parameter) for k, v in state.items() if isinstance(ref[k], nn.Parameter))
    for got, want in zip(_features(model, images, tokens), _features(reference, images, tokens)):
        assert torch.equal(got, want)
