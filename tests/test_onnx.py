"""ONNX export: every tower family's graphs match PyTorch at batch sizes other than the exported one."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import perturb_, tiny_config

import clipworks
from clipworks.onnx_export import CONFIG_FILE, export_onnx, load_onnx

# clipworks.onnx_export imports these only when called, so importing it above needs none of them
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOLERANCE = 1e-4
CAPTIONS = [
    "a photo of a cat",
    "a dog",
    "a small black dog running on the beach at sunset while two people watch from a wooden bench",
    "two red cars",
    # long enough to be cut to the full 77 tokens, end token last
    " ".join(["a very long caption about a colourful market street full of people and fruit"] * 8),
    "a bird",
]
# Batch sizes 1, 3 and 5 (the export used 2), each with a different longest sequence; 5 reaches all 77.
BATCHES = {1: [0], 3: [1, 2, 3], 5: [5, 1, 4, 0, 3]}


def _tiny(name: str) -> clipworks.CLIP:
    model = clipworks.create_model(tiny_config(clipworks.get_preset(name)))
    perturb_(model)
    return model.eval()


def _token_batches(model: clipworks.CLIP) -> dict[int, torch.Tensor]:
    """Real CLIP token ids at the model's context length (PE-Core: 32, CoCa: 76, the longest caption cut to fill it);
    for SigLIP's vocabulary, random ids of the same lengths padded with its pad id."""
    text = model.config.text
    tok = clipworks.get_tokenizer("ViT-B-32").tokenize(CAPTIONS, context_length=text.context_length)
    assert int(tok.lengths.max()) == text.context_length
    if text.vocab_size == clipworks.Tokenizer.vocab_size:
        return {b: tok.ids[rows] for b, rows in BATCHES.items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.full((len(CAPTIONS), text.context_length), text.pad_id, dtype=torch.long)
    for i, n in enumerate(tok.lengths.clamp(max=text.context_length).tolist()):
        ids[i, :n] = torch.randint(2, text.vocab_size, (n,), generator=g)
    return {b: ids[rows] for b, rows in BATCHES.items()}


def _diff(a: np.ndarray, b: torch.Tensor) -> float:
    return float(np.abs(a - b.numpy()).max())


@pytest.mark.parametrize(
    "name, normalize",
    [("ViT-B-32", False), ("ViT-B-32-quickgelu", True), ("RN50", False), ("convnext_base_w", False),
     ("ViT-B-16-SigLIP", False),
     # timm image towers (RoPE and EVA's computed buffers, PE's attention pool, ViTamin's conv stem, FastViT's
     # BatchNorm branches, the MCi ViT) and CoCa (attentional pool, appended class embedding, padding mask)
     ("EVA02-B-16", False), ("EVA01-g-14", False), ("PE-Core-T-16-384", False), ("ViTamin-S", False),
     ("MobileCLIP-S1", False), ("MobileCLIP-B", True), ("coca_ViT-B-32", False)],
)  # fmt: skip
def test_export_matches_pytorch(tmp_path, name, normalize, record_property):
    model = _tiny(name)
    out = export_onnx(model, tmp_path / "onnx", normalize=normalize)
    assert not model.training
    for path in (out.image_path, out.text_path):
        onnx.checker.check_model(str(path))
    meta = json.loads(out.config_path.read_text())
    assert clipworks.CLIPConfig.from_dict(meta["model"]) == model.config
    assert clipworks.PreprocessConfig.from_dict(meta["preprocess"]) == model.preprocess_config
    assert meta["opset"] == out.opset >= 18 and meta["normalize"] == normalize

    encoder = load_onnx(out.path)
    assert encoder.config == model.config and encoder.normalized == normalize
    S = model.image_size
    g = torch.Generator().manual_seed(1)
    diffs = {}
    for batch, tokens in _token_batches(model).items():
        images = torch.randn(batch, 3, S, S, generator=g)
        with torch.no_grad():
            image_ref, text_ref = model.encode_image(images), model.encode_text(tokens)
        image, text = encoder.encode_image(images), encoder.encode_text(tokens.numpy())
        assert image.shape == (batch, model.config.embed_dim) and text.shape == (batch, model.config.embed_dim)
        if normalize:  # the graphs normalise; compare with PyTorch's normalised features
            image_ref, text_ref = (F.normalize(t, dim=-1) for t in (image_ref, text_ref))
            np.testing.assert_allclose(np.linalg.norm(image, axis=-1), 1.0, atol=1e-5)
        diffs[batch] = {
            "image_raw": _diff(image, image_ref),
            "text_raw": _diff(text, text_ref),
            "image": _diff(encoder.encode_image(images, normalize=True), F.normalize(image_ref, dim=-1)),
            "text": _diff(encoder.encode_text(tokens, normalize=True), F.normalize(text_ref, dim=-1)),
            "scale": max(float(image_ref.abs().max()), float(text_ref.abs().max())),
        }
    record_property("max_abs_diff", diffs)
    print(name, diffs)
    for batch, d in diffs.items():
        assert d["image"] <= TOLERANCE and d["text"] <= TOLERANCE, (batch, d)
        assert max(d["image_raw"], d["text_raw"]) <= TOLERANCE * max(1.0, d["scale"]), (batch, d)


def test_failed_export_leaves_earlier_export_and_no_temp(tmp_path, monkeypatch):
    model = _tiny("ViT-B-32").train()
    model.visual.eval()  # a mixed mode, which must come back as it was
    out = tmp_path / "onnx"
    out.mkdir()
    (out / CONFIG_FILE).write_text('{"earlier": true}')

    def boom(x):
        raise RuntimeError("text tower broke mid-export")

    # The image graph is written first, so this fails with one file already in the temporary directory.
    monkeypatch.setattr(model.text.ln_final, "forward", boom)
    with pytest.raises(Exception, match="text tower broke"):
        export_onnx(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE]
    assert json.loads((out / CONFIG_FILE).read_text()) == {"earlier": True}
    assert model.training and model.text.training and not model.visual.training


def test_refuses_bad_input(tmp_path):
    model = _tiny("ViT-B-32")
    with pytest.raises(ValueError, match="18"):
        export_onnx(model, tmp_path / "a", opset=17)
    with pytest.raises(ValueError, match="float32"):
        export_onnx(_tiny("ViT-B-32").to(torch.bfloat16), tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holding no checkpoint"):
        export_onnx(model, tmp_path / "c")
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match=CONFIG_FILE):
        load_onnx(tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_missing_dependency_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"clipworks\[onnx\]"):
        export_onnx(_tiny("ViT-B-32"), tmp_path / "x")
    with pytest.raises(ImportError, match=r"clipworks\[onnx\]"):
        load_onnx(tmp_path / "x")


def test_cli_convert_to_onnx(tmp_path, capsys):
    import clipworks
    from clipworks.cli import main

    model = _tiny("ViT-B-32")
    clipworks.save_pretrained(model, tmp_path / "ckpt")
    assert main(["convert", str(tmp_path / "onnx"), "--model", f"local-dir:{tmp_path / 'ckpt'}", "--to", "onnx",
                 "--normalize"]) == 0  # fmt: skip
    assert "image_encoder.onnx" in capsys.readouterr().out
    ids = clipworks.get_tokenizer("ViT-B-32")(["a cat"]).numpy()
    got = load_onnx(tmp_path / "onnx").encode_text(ids)
    with torch.no_grad():
        want = model.encode_text(torch.from_numpy(ids), normalize=True).numpy()
    assert abs(got - want).max() <= 1e-4
