"""LAION's aesthetic predictors read by `load_head` and `clipworks score`, against the original MLP's layout."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image
from reference import tiny_config
from torch import nn

import clipworks
from clipworks.cli import main
from clipworks.eval.scoring import load_head


class ReferenceMLP(nn.Module):
    """The MLP of improved-aesthetic-predictor's simple_inference.py (its Lightning parts left out): the same
    `layers` Sequential, so its state dict has the same keys."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, x):
        return self.layers(x)


def _reference(input_size: int, seed: int = 0) -> ReferenceMLP:
    torch.manual_seed(seed)
    return ReferenceMLP(input_size).eval()


def _embeddings(n: int, width: int) -> torch.Tensor:
    torch.manual_seed(1)
    return nn.functional.normalize(torch.randn(n, width), dim=-1)  # (N, E), as the original script normalises


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_improved_aesthetic_predictor_matches_the_original_mlp(tmp_path, suffix):
    ref = _reference(768)
    sd = ref.state_dict()
    assert [tuple(sd[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == [
        (1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]  # fmt: skip
    path = tmp_path / f"sac+logos+ava1-l14-linearMSE{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    loaded = load_head(path)
    assert loaded.model is None and loaded.head[0].in_features == 768
    assert [type(m).__name__ for m in loaded.head][:8] == [type(m).__name__ for m in ref.layers]
    x = _embeddings(16, 768)
    with torch.no_grad():
        got, want = loaded.head(x), ref(x)[:, 0]
    assert got.shape == (16,)
    assert (got - want).abs().max().item() <= 1e-6


def test_laion_linear_head_matches_a_linear_layer(tmp_path):
    torch.manual_seed(2)
    linear = nn.Linear(768, 1)
    torch.save(linear.state_dict(), tmp_path / "sa_0_4_vit_l_14_linear.pth")
    head = load_head(tmp_path / "sa_0_4_vit_l_14_linear.pth").head
    x = _embeddings(8, 768)
    with torch.no_grad():
        assert (head(x) - linear(x)[:, 0]).abs().max().item() <= 1e-6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the --model argument of a saved tiny model with embed_dim 32, two images)."""
    root = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(0)
    model = clipworks.create_model(replace(tiny_config(clipworks.get_preset("ViT-B-32")), embed_dim=32))
    clipworks.save_pretrained(model, root / "model")
    images = []
    for name, rgb in (("red.png", (220, 30, 30)), ("blue.png", (30, 30, 220))):
        Image.new("RGB", (40, 30), rgb).save(root / name)
        images.append(root / name)
    return f"local-dir:{root / 'model'}", images


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_score_with_the_aesthetic_mlp_end_to_end(tiny, tmp_path, capsys):
    model_arg, images = tiny
    ref = _reference(32, seed=3)
    torch.save(ref.state_dict(), tmp_path / "aesthetic.pth")
    code, out, _ = _run(capsys, "score", "--head", tmp_path / "aesthetic.pth", "--model", model_arg, *images)
    assert code == 0
    lines = [line.split() for line in out.strip().splitlines()]
    assert [p for _, p in lines] == [str(p) for p in images]

    from clipworks.data.decode import load_image

    model, _, preprocess = clipworks.create_model_and_transforms(model_arg)
    with torch.no_grad():
        pixels = torch.stack([preprocess(load_image(p)) for p in images])
        x = nn.functional.normalize(model.encode_image(pixels), dim=-1)  # (2, 32)
        want = ref(x)[:, 0].tolist()
    assert [float(s) for s, _ in lines] == pytest.approx(want, abs=1e-4)  # printed with 4 decimals


def test_a_pickled_module_is_refused(tiny, tmp_path, capsys):
    model_arg, images = tiny
    torch.save(_reference(32), tmp_path / "module.pth")  # the whole module pickled, not its state dict
    with pytest.raises(ValueError, match=r"pickled .*ReferenceMLP.*state_dict\(\)"):
        load_head(tmp_path / "module.pth")
    code, _, err = _run(capsys, "score", "--head", tmp_path / "module.pth", "--model", model_arg, images[0])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "does not unpickle" in lines[0] and "weights_only=False" not in err


def test_wrong_embedding_width_names_both(tiny, tmp_path, capsys):
    model_arg, images = tiny
    torch.save(_reference(768).state_dict(), tmp_path / "l14.pth")
    code, _, err = _run(capsys, "score", "--head", tmp_path / "l14.pth", "--model", model_arg, images[0])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "768-d" in lines[0] and "32-d" in lines[0]


def test_aesthetic_keys_with_other_shapes_are_named(tmp_path):
    sd = _reference(32).state_dict()
    sd["layers.2.weight"], sd["layers.2.bias"] = torch.zeros(100, 1024), torch.zeros(100)
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"improved aesthetic predictor.*'layers.2.weight': \(100, 1024\)") as e:
        load_head(tmp_path / "odd.pth")
    assert "\n" not in str(e.value)
