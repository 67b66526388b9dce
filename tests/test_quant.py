"""Int8 CPU inference (`quantize_int8`): the arithmetic of one layer, and whole models against fp32."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import tiny_config
from test_search_embed import _embed, _photos, tiny  # noqa: F401  (the module's model fixture)

import clipworks
from clipworks.cli import main
from clipworks.models.quant import Int8Linear, is_quantized, quantize_int8
from clipworks.search.store import read_embeddings


def _linear(n_in=48, n_out=40, bias=True, seed=0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(n_in, n_out, bias=bias)


def test_int8_linear_computes_the_product_of_its_quantised_operands():
    layer = _linear()
    q = Int8Linear(layer)
    x = torch.randn(5, 7, 48) * 3
    rows = x.reshape(-1, 48)
    scale = rows.abs().amax(1, keepdim=True) / 127  # per row of the input
    w_scale = layer.weight.abs().amax(1, keepdim=True) / 127  # per output channel of the weight
    xq, wq = torch.round(rows / scale), torch.round(layer.weight.detach() / w_scale)
    assert xq.abs().max() == 127 and wq.abs().max() == 127 and torch.equal(q.weight_int8.float(), wq)
    want = ((xq.double() @ wq.double().t()) * scale.double() * w_scale.double().t() + layer.bias.double()).float()
    with torch.no_grad():
        got = q(x)
    assert got.shape == (5, 7, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got.reshape(-1, 40), want, rtol=1e-5, atol=1e-5)
    # and close to the fp32 layer it replaces: a few parts in a thousand of the output's size
    with torch.no_grad():
        exact = layer(x)
    assert (got - exact).abs().max() < 0.01 * exact.abs().max()


def test_int8_linear_slices_zero_rows_and_devices():
    layer = _linear(bias=False)
    q = Int8Linear(layer)
    x = torch.randn(3, 48)
    x[1] = 0  # an all-zero row: zeros out, not NaN
    with torch.no_grad():
        full = q(x)
        assert torch.equal(q.forward_rows(x, 10, 25), full[:, 10:25])
        assert torch.equal(full[1], torch.zeros(40)) and torch.isfinite(full).all()
        assert q(torch.zeros(0, 48)).shape == (0, 40)
        assert q(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="no gradient flows"):
        q(torch.randn(2, 48, requires_grad=True))  # a silently cut graph would be worse
    with pytest.raises(RuntimeError, match="CPU only"):
        q(torch.zeros(2, 48, device="meta"))
    assert "in_features=48, out_features=40, bias=False" in repr(q)


@pytest.mark.parametrize("preset", ["ViT-B-32", "RN50", "ViT-SO400M-16-SigLIP-i18n-256", "MobileCLIP-S1", "coca_ViT-B-32"])
def test_quantised_model_stays_close_to_fp32(preset):
    torch.manual_seed(0)
    model = clipworks.create_model(tiny_config(clipworks.get_preset(preset))).eval()
    int8 = quantize_int8(copy.deepcopy(model))
    assert not is_quantized(model) and is_quantized(int8)
    native_vit = model.config.vision.kind == "vit"
    # the text tower's two blocks, a native ViT's, and CoCa's caption decoder's four (two self, two cross)
    blocks = 2 * native_vit + 2 + 4 * (model.decoder is not None)
    assert sum(isinstance(m, Int8Linear) for m in int8.modules()) == 4 * blocks
    size = model.config.vision.image_size
    images, tokens = torch.randn(6, 3, size, size), clipworks.get_tokenizer(model)(["a cat", "two dogs on grass"] * 3)
    with torch.no_grad():
        for encode in ("encode_image", "encode_text"):
            arg = images if encode == "encode_image" else tokens
            a, b = getattr(model, encode)(arg, normalize=True), getattr(int8, encode)(arg, normalize=True)
            if encode == "encode_image" and not native_vit:
                assert torch.equal(a, b)  # a ResNet tower has no blocks, timm's are timm's: they stay fp32
                continue
            cos = (a * b).sum(-1)
            assert cos.min() > 0.99 and not torch.equal(a, b), (encode, cos)
    assert not any(p.requires_grad for p in int8.parameters())  # inference only: works without no_grad too
    torch.testing.assert_close(int8.encode_text(tokens), int8.encode_text(tokens).detach())
    if native_vit:
        with pytest.raises(RuntimeError, match="no gradient flows"):
            int8.encode_image(images.requires_grad_())  # e.g. CLIP guidance: needs the fp32 model


def test_quantize_refuses_what_it_cannot_quantise(monkeypatch):
    torch.manual_seed(0)
    model = clipworks.create_model(tiny_config(clipworks.get_preset("RN50")))
    with pytest.raises(ValueError, match="no transformer blocks"):
        quantize_int8(model.visual)  # a ResNet tower alone
    with pytest.raises(ValueError, match="runs on the CPU"):
        quantize_int8(torch.nn.Linear(2, 2, device="meta"))
    from clipworks.models import quant

    assert quant.int8_products_available()  # this machine's torch has them
    monkeypatch.setattr(quant, "int8_products_available", lambda: False)
    with pytest.raises(ValueError, match="no CPU int8 matrix product"):
        quantize_int8(model)


def test_int8_embed_is_recorded_and_resumes_only_as_int8(tiny, tmp_path):  # noqa: F811
    model, preprocess, tokenizer, name = tiny
    _photos(tmp_path / "photos", 5)
    data = f"folder:{tmp_path / 'photos'}"
    int8 = (quantize_int8(copy.deepcopy(model)), preprocess, tokenizer, name)
    _embed(int8, data, tmp_path / "q", dtype="float32", workers=2)
    _embed(tiny, data, tmp_path / "f", dtype="float32")
    (a, records_a, _), (b, records_b, _) = read_embeddings(tmp_path / "q"), read_embeddings(tmp_path / "f")
    assert [r["key"] for r in records_a] == [r["key"] for r in records_b]
    assert (a * b).sum(1).min() > 0.99 and not np.array_equal(a, b)
    with pytest.raises(ValueError, match="int8: True there, None now"):
        _embed(tiny, data, tmp_path / "q")
    with pytest.raises(ValueError, match="int8: None there, True now"):
        _embed(int8, data, tmp_path / "f")
    assert main(["embed", "--model", name, "--data", data, "--out", str(tmp_path / "cli"), "--int8", "--quiet",
                 "--workers", "0", "--dtype", "float32"]) == 0  # fmt: skip
    c, _, _ = read_embeddings(tmp_path / "cli")
    np.testing.assert_allclose(c, a, atol=1e-6)  # the CLI's --int8 is the same quantisation


def test_int8_changes_nothing_it_should_not():
    layer = _linear()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    Int8Linear(layer)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())  # the source layer is untouched
    q = Int8Linear(layer)
    assert not list(q.parameters())  # buffers only: nothing for an optimiser to train
    x = F.normalize(torch.randn(4, 48), dim=-1)
    with torch.no_grad():
        assert torch.equal(q(x), q(x))  # deterministic
