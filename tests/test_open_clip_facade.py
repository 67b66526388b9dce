"""OpenCLIP code runs unchanged on `clipworks.open_clip`, with OpenCLIP's numbers: its README example, an
OpenCLIP-style training step, and the API calls its users make (signatures, return conventions, locking)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import clipworks
import clipworks.open_clip as cw_open_clip
from clipworks.checkpoints.export import save_pretrained
from clipworks.config import CLIPConfig, TextConfig, VisionTransformerConfig

open_clip = pytest.importorskip("open_clip")

# OpenCLIP's README example, word for word but for the weights and the image file (its docs/CLIP.png is RGBA).
README = """
import torch
from PIL import Image
import open_clip

model, _, preprocess = open_clip.create_model_and_transforms('ViT-B-32', pretrained=PRETRAINED)
model.eval()  # model in train mode by default, impacts some models with BatchNorm or stochastic depth active
tokenizer = open_clip.get_tokenizer('ViT-B-32')

image = preprocess(Image.open(IMAGE)).unsqueeze(0)
text = tokenizer(["a diagram", "a dog", "a cat"])

with torch.no_grad(), torch.autocast("cuda"):
    image_features = model.encode_image(image)
    text_features = model.encode_text(text)
    image_features /= image_features.norm(dim=-1, keepdim=True)
    text_features /= text_features.norm(dim=-1, keepdim=True)

    text_probs = (100.0 * image_features @ text_features.T).softmax(dim=-1)

print("Label probs:", text_probs)
"""

# The core of an OpenCLIP training loop (open_clip_train's train_one_epoch, reduced to one step), with the keywords
# its main() passes to the factory.
TRAIN_STEP = """
import torch
import open_clip

model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
    model_name=MODEL, pretrained=None, precision="fp32", device="cpu", force_quick_gelu=False, cache_dir=CACHE,
    output_dict=False)
tokenizer = open_clip.get_tokenizer(model_name=MODEL, context_length=CONTEXT)
model.lock_image_tower(unlocked_groups=1)
model.train()
loss_fn = open_clip.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)

images = torch.stack([preprocess_val(im) for im in IMAGES])
texts = tokenizer(CAPTIONS)
image_features, text_features, logit_scale = model(images, texts)
total_loss = loss_fn(image_features, text_features, logit_scale)
optimizer.zero_grad()
total_loss.backward()
optimizer.step()

model.eval()
with torch.no_grad():
    after = model(image=images, text=texts)
"""


def _run(snippet: str, library, **names) -> dict:
    scope = {"open_clip": library, **names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast("cuda") on a CPU-only machine says it is disabled
        exec(snippet.replace("import open_clip\n", ""), scope)  # noqa: S102 - the snippets above, nothing else
    return scope


def _rgba_diagram(path) -> str:
    """A transparent PNG like OpenCLIP's docs/CLIP.png: drawn shapes on a fully transparent background."""
    image = Image.new("RGBA", (320, 240), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 30, 150, 200), fill=(40, 90, 200, 255))
    draw.ellipse((170, 40, 300, 170), fill=(230, 120, 20, 160))
    draw.text((30, 210), "text", fill=(0, 0, 0, 255))
    image.save(path)
    return str(path)


@pytest.fixture(scope="module")
def vit_b_32_weights(tmp_path_factory):
    """OpenCLIP's ViT-B-32 with random weights, as a safetensors file in OpenCLIP's key layout."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    path = tmp_path_factory.mktemp("weights") / "vit_b_32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def test_readme_example_gives_open_clips_numbers(vit_b_32_weights, tmp_path):
    image = _rgba_diagram(tmp_path / "CLIP.png")
    ours = _run(README, cw_open_clip, PRETRAINED=vit_b_32_weights, IMAGE=image)
    ref = _run(README, open_clip, PRETRAINED=vit_b_32_weights, IMAGE=image)
    assert torch.equal(ours["image"], ref["image"])  # the RGBA image preprocesses to OpenCLIP's tensor, bit for bit
    assert torch.equal(ours["text"], ref["text"])
    for key in ("image_features", "text_features", "text_probs"):
        assert (ours[key] - ref[key]).abs().max().item() <= 1e-5, key


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A small two-tower model in OpenCLIP's directory layout (open_clip_config.json + weights): both libraries
    load it as `local-dir:`."""
    cfg = CLIPConfig(
        embed_dim=24,
        vision=VisionTransformerConfig(image_size=32, patch_size=8, width=32, layers=3, heads=2),
        text=TextConfig(context_length=16, width=32, layers=3, heads=2),
    )
    torch.manual_seed(0)
    model = clipworks.create_model(cfg)
    with torch.no_grad():  # every parameter away from its initial value, so no key can match by accident
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_pretrained(model, tmp_path_factory.mktemp("tiny") / "model", format="open_clip")


def _photos(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


def test_training_step_gives_open_clips_loss_and_update(tiny_dir, tmp_path):
    names = {"MODEL": f"local-dir:{tiny_dir}", "CACHE": str(tmp_path / "cache"), "CONTEXT": 16,
             "IMAGES": _photos(4), "CAPTIONS": ["a red square", "a blue circle", "two dogs", "a cat on a mat"]}  # fmt: skip
    ours = _run(TRAIN_STEP, cw_open_clip, **names)
    ref = _run(TRAIN_STEP, open_clip, **names)
    assert abs(ours["total_loss"].item() - ref["total_loss"].item()) <= 1e-5
    assert ours["logit_scale"].item() == pytest.approx(ref["logit_scale"].item(), rel=1e-6)
    trainable = [sum(p.numel() for p in s["model"].parameters() if p.requires_grad) for s in (ours, ref)]
    assert trainable[0] == trainable[1]  # the same parameters were left unlocked
    for i in (0, 1):  # after the step: features of the updated model agree
        assert (ours["after"][i] - ref["after"][i]).abs().max().item() <= 1e-5
    before = ours["image_features"].detach()
    assert (ours["after"][1] - ours["text_features"].detach()).abs().max().item() > 1e-3  # the text tower trained
    assert ours["after"][0].shape == before.shape


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("groups", [0, 1, 2, 4, 99])
def test_locking_leaves_open_clips_parameters_trainable(tiny_dir, groups):
    for lock, kwargs in (("lock_image_tower", {"unlocked_groups": groups}),
                         ("lock_text_tower", {"unlocked_layers": groups})):  # fmt: skip
        models = [lib.create_model(f"local-dir:{tiny_dir}") for lib in (cw_open_clip, open_clip)]
        for m in models:
            getattr(m, lock)(**kwargs)
        assert _trainable(models[0]) == _trainable(models[1]), (lock, groups)


def test_output_conventions(tiny_dir):
    images = torch.randn(2, 3, 32, 32)
    texts = cw_open_clip.tokenize(["a cat", "a dog"], context_length=16)
    models = [lib.create_model(f"local-dir:{tiny_dir}", output_dict=True) for lib in (cw_open_clip, open_clip)]
    outs = [m(image=images, text=texts) for m in models]
    assert isinstance(outs[0], dict) and set(outs[0]) == set(outs[1])
    for key in outs[1]:
        assert (outs[0][key] - outs[1][key]).abs().max().item() <= 1e-5
    plain = cw_open_clip.create_model(f"local-dir:{tiny_dir}")
    out = plain(images, texts)
    assert len(out) == 3 and out.logit_bias is None  # (image_features, text_features, logit_scale), as OpenCLIP
    image_only = plain(image=images)
    assert image_only.text_features is None and image_only.image_features.shape == (2, 24)
    assert torch.equal(plain.encode_image(image=images), plain.encode_image(images))
    assert torch.equal(plain.encode_text(text=texts), plain.encode_text(texts))
    assert plain.visual.image_size == models[1].visual.image_size == (32, 32)


def test_siglip_output_has_four_fields():
    from tests.reference import tiny_config

    model = clipworks.create_model(tiny_config(clipworks.get_preset("ViT-B-16-SigLIP")))
    v = model.config.vision
    out = model(torch.randn(2, 3, v.image_size, v.image_size), torch.randint(0, 100, (2, model.context_length)))
    image_features, text_features, logit_scale, logit_bias = out
    assert logit_bias is model.logit_bias and out.logits()[0].shape == (2, 2)


def test_factory_keywords_and_helpers(tiny_dir, vit_b_32_weights):
    model, preprocess = cw_open_clip.create_model_from_pretrained("ViT-B-32", pretrained=vit_b_32_weights)
    ref_model, ref_preprocess = open_clip.create_model_from_pretrained("ViT-B-32", pretrained=vit_b_32_weights)
    photo = _photos(1)[0]
    assert torch.equal(preprocess(photo), ref_preprocess(photo))
    with pytest.raises(ValueError, match="require_pretrained"):
        cw_open_clip.create_model_from_pretrained("ViT-B-32")
    assert cw_open_clip.create_model_from_pretrained("ViT-B-32", vit_b_32_weights, return_transform=False).training is False

    # force_image_size interpolates the position table as OpenCLIP does
    ours = cw_open_clip.create_model("ViT-B-32", pretrained=vit_b_32_weights, force_image_size=160)
    ref = open_clip.create_model("ViT-B-32", pretrained=vit_b_32_weights, force_image_size=160).eval()
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        assert (ours.encode_image(x, normalize=True) - ref.encode_image(x, normalize=True)).abs().max() <= 1e-5
    assert ours.visual.image_size == ref.visual.image_size == (160, 160)

    quick = cw_open_clip.create_model(f"local-dir:{tiny_dir}", force_quick_gelu=True)
    assert quick.config.vision.act == quick.config.text.act == "quick_gelu"
    half = cw_open_clip.create_model(f"local-dir:{tiny_dir}", precision="pure_bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="TorchScript"):
        cw_open_clip.create_model(f"local-dir:{tiny_dir}", jit=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        cw_open_clip.create_model(f"local-dir:{tiny_dir}", colour="red")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cw_open_clip.create_model("ViT-B-32", pretrained="./missing/ViT-B-32.safetensors")


def test_tokenizer_and_registry_helpers():
    texts = ["a photo of a cat.", "Don't panic!"]
    assert torch.equal(cw_open_clip.tokenize(texts), open_clip.tokenize(texts))
    assert torch.equal(cw_open_clip.tokenize(texts, context_length=12), open_clip.tokenize(texts, context_length=12))
    ids = open_clip.tokenize(texts)[0]
    assert cw_open_clip.decode(ids) == open_clip.decode(ids)
    tok = cw_open_clip.get_tokenizer(model_name="ViT-B-32", context_length=20)
    assert tok(texts).shape == (2, 20)
    # OpenCLIP's decoding (word ends become spaces), then transformers' clean-up of spaces before punctuation
    assert tok.decode(tok(texts)[1], skip_special_tokens=True) == "don 't panic ! "
    assert tok.batch_decode(tok(texts), skip_special_tokens=True, clean_up_tokenization_spaces=True) == [
        "a photo of a cat. ", "don 't panic! "]  # fmt: skip

    ours, ref = set(cw_open_clip.list_pretrained(as_str=True)), set(open_clip.list_pretrained(as_str=True))
    assert ref <= ours and all(isinstance(s, str) and ":" in s for s in ours)
    assert set(cw_open_clip.list_pretrained_tags_by_model("ViT-B-32")) >= set(
        open_clip.list_pretrained_tags_by_model("ViT-B-32"))  # fmt: skip
    for name in ("ViT-B-32", "ViT-L-14-336", "RN50", "convnext_base_w"):
        ours_cfg, ref_cfg = cw_open_clip.get_model_config(name), open_clip.get_model_config(name)
        assert ours_cfg["embed_dim"] == ref_cfg["embed_dim"]
        for key in ("image_size", "layers", "width", "patch_size"):
            if key in ours_cfg["vision_cfg"] or key in ref_cfg["vision_cfg"]:
                assert ours_cfg["vision_cfg"].get(key) == ref_cfg["vision_cfg"].get(key), (name, key)
    assert cw_open_clip.get_model_config("no-such-model") is None
    assert cw_open_clip.IMAGENET_CLASSNAMES == tuple(open_clip.IMAGENET_CLASSNAMES)
    assert [t("cat") for t in cw_open_clip.OPENAI_IMAGENET_TEMPLATES] == [
        t("cat") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]  # fmt: skip


def test_zero_shot_classifier_and_transforms(tiny_dir):
    models = [lib.create_model(f"local-dir:{tiny_dir}") for lib in (cw_open_clip, open_clip)]
    tokenizers = [lib.get_tokenizer(f"local-dir:{tiny_dir}") for lib in (cw_open_clip, open_clip)]
    names, templates = ["cat", "dog", "car"], open_clip.SIMPLE_IMAGENET_TEMPLATES
    weights = [cw_open_clip.build_zero_shot_classifier(models[0], tokenizers[0], names, templates, 2),
               open_clip.build_zero_shot_classifier(models[1], tokenizers[1], names, templates, 2)]  # fmt: skip
    assert weights[0].shape == weights[1].shape == (24, 3)
    assert (weights[0] - weights[1]).abs().max().item() <= 1e-5
    photo = _photos(1)[0]
    for kwargs in ({}, {"resize_mode": "longest", "interpolation": "bilinear"}, {"mean": (0.5,) * 3, "std": (0.5,) * 3}):
        ours = cw_open_clip.image_transform(48, is_train=False, **kwargs)
        ref = open_clip.image_transform(48, is_train=False, **kwargs)
        assert torch.equal(ours(photo), ref(photo)), kwargs


def test_random_weights_warn_once_per_preset():
    from clipworks.factory import _warned_random

    _warned_random.discard("RN50")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clipworks.create_model("RN50")
        clipworks.create_model("RN50")
        clipworks.create_model("RN50", load_weights=False)
    said = [w for w in caught if issubclass(w.category, clipworks.RandomWeightsWarning)]
    assert len(said) == 1 and "random (untrained) weights" in str(said[0].message)


def test_alpha_white_is_available_by_name():
    from clipworks.config import PreprocessConfig
    from clipworks.transforms import image_transform

    image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    drop = image_transform(PreprocessConfig(image_size=32))(image)  # OpenCLIP: transparent black stays black
    white = image_transform(PreprocessConfig(image_size=32), alpha="white")(image)
    mean = torch.tensor(PreprocessConfig().mean).view(3, 1, 1)
    std = torch.tensor(PreprocessConfig().std).view(3, 1, 1)
    assert torch.allclose(drop * std + mean, torch.zeros(3, 32, 32), atol=1e-6)
    assert torch.allclose(white * std + mean, torch.ones(3, 32, 32), atol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        image_transform(PreprocessConfig(), alpha="black")
