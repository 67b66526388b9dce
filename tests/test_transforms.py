"""Image transforms: bit-identical to OpenCLIP's evaluation transforms, seeded training augmentation."""

import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from clipworks.config import SIGLIP_MEAN, SIGLIP_STD, PreprocessConfig
from clipworks.transforms import AugmentConfig, image_transform

open_clip = pytest.importorskip("open_clip")
from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: E402

# (width, height): degenerate, odd, already the output size, smaller (upscaling), photo-like, and extreme
# aspect ratios on both sides of every branch (crop rows or columns, Pillow's pass order, row skipping).
SIZES = [
    (1, 1), (1, 2), (3, 1), (7, 5), (224, 224), (223, 225), (225, 223), (100, 100), (150, 100), (100, 150),
    (333, 517), (517, 333), (640, 480), (480, 640), (1080, 1920), (1000, 3000), (3000, 1000), (224, 500),
    (500, 224), (1, 400), (400, 1), (5000, 3), (3, 5000), (1, 5000),
]  # fmt: skip


def _noise(width, height, seed=0, channels=3):
    # Noise makes every off-by-one in sizes, offsets or filters show up in the output.
    shape = (height, width, channels) if channels > 1 else (height, width)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


@pytest.fixture(scope="module")
def reference():
    """OpenCLIP's evaluation transforms by (resize_mode, interpolation)."""
    cache = {}

    def get(mode="shortest", interpolation="bicubic", mean=None, std=None):
        key = (mode, interpolation, mean, std)
        if key not in cache:
            if mode == "shortest" and interpolation == "bicubic" and mean is None:
                cache[key] = open_clip.image_transform(224, is_train=False)  # the path most users take
            else:
                kw = {} if mean is None else {"mean": mean, "std": std}
                cfg = PreprocessCfg(size=224, resize_mode=mode, interpolation=interpolation, **kw)
                cache[key] = image_transform_v2(cfg, is_train=False)
        return cache[key]

    return get


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_shortest_matches_open_clip_exactly(size, reference):
    image = _noise(*size, seed=size[0] * 7 + size[1])
    out = image_transform(PreprocessConfig())(image)
    assert out.dtype == torch.float32 and out.shape == (3, 224, 224) and out.is_contiguous()
    assert torch.equal(out, reference()(image))


# The extreme sizes cost seconds in OpenCLIP's "longest"/"squash" as well; "shortest" covers them above.
@pytest.mark.parametrize("size", [s for s in SIZES if max(s) <= 3000], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(
    "mode, interpolation",
    [("longest", "bicubic"), ("longest", "bilinear"), ("squash", "bicubic"), ("squash", "bilinear"),
     ("shortest", "bilinear")],
)  # fmt: skip
def test_modes_and_filters_match_open_clip_exactly(size, mode, interpolation, reference):
    image = _noise(*size, seed=size[0] + size[1])
    cfg = PreprocessConfig(resize_mode=mode, interpolation=interpolation)
    assert torch.equal(image_transform(cfg)(image), reference(mode, interpolation)(image))


def test_longest_keeps_a_pixel_where_open_clip_fails(reference):
    image = _noise(1, 1200, seed=2)  # the width scales to 0.19 pixels
    with pytest.raises(ValueError):
        reference("longest", "bicubic")(image)
    out = image_transform(PreprocessConfig(resize_mode="longest"))(image)
    cfg = PreprocessConfig()
    fill = ((0 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)).view(3, 1)  # fill_color 0, normalised
    assert out.shape == (3, 224, 224)
    assert torch.allclose(out[:, :, 110], fill.expand(3, 224)) and torch.allclose(out[:, :, 112], fill.expand(3, 224))
    assert not torch.allclose(out[:, :, 111], fill.expand(3, 224))  # the image's column, centred as OpenCLIP pads


def test_fill_color_and_siglip_normalisation_match_open_clip():
    image = _noise(300, 120, seed=3)
    cfg = PreprocessCfg(size=224, resize_mode="longest", fill_color=128, mean=SIGLIP_MEAN, std=SIGLIP_STD)
    ours = PreprocessConfig(resize_mode="longest", fill_color=128, mean=SIGLIP_MEAN, std=SIGLIP_STD)
    assert torch.equal(image_transform(ours)(image), image_transform_v2(cfg, is_train=False)(image))


def test_other_output_sizes_match_open_clip():
    image = _noise(517, 333, seed=4)
    for size in (1, 32, 256, 336, 600):
        assert torch.equal(image_transform(PreprocessConfig(image_size=size))(image),
                           open_clip.image_transform(size, is_train=False)(image))  # fmt: skip


def test_grayscale_input_matches_open_clip(reference):
    image = _noise(640, 427, seed=5, channels=1)
    assert image.mode == "L"
    assert torch.equal(image_transform(PreprocessConfig())(image), reference()(image))


def _translucent(width: int, height: int, seed: int) -> Image.Image:
    rgba = np.asarray(_noise(width, height, seed=seed).convert("RGBA")).copy()
    rgba[:, :, 3] = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    return Image.fromarray(rgba, "RGBA")


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PA", "CMYK", "1", "I;16"])
def test_other_modes_match_open_clip_exactly(mode, resize_mode):
    # OpenCLIP resizes in the image's own mode (alpha premultiplied, palettes nearest-neighbour), then drops alpha
    image = _translucent(300, 200, seed=6).convert(mode) if mode != "I;16" else Image.fromarray(
        np.random.default_rng(6).integers(0, 65536, (200, 300), dtype=np.uint16))  # fmt: skip
    ours = image_transform(PreprocessConfig(resize_mode=resize_mode))
    ref = open_clip.image_transform(224, is_train=False, resize_mode=resize_mode)
    assert torch.equal(ours(image), ref(image))


def test_alpha_white_composites_as_load_image_does(tmp_path):
    from clipworks.data.decode import load_image

    image = _translucent(120, 90, seed=8)
    image.save(tmp_path / "logo.png")
    white = image_transform(PreprocessConfig(), alpha="white")
    assert torch.equal(white(image), image_transform(PreprocessConfig())(load_image(tmp_path / "logo.png")))
    assert not torch.equal(white(image), image_transform(PreprocessConfig())(image))


def test_fast_mode_is_close_but_opt_in():
    y, x = np.mgrid[0:1080, 0:1920]
    image = Image.fromarray(np.stack([x * 255 // 1919, y * 255 // 1079, (x + y) % 256], -1).astype(np.uint8))
    exact = image_transform(PreprocessConfig())(image)
    fast = image_transform(PreprocessConfig(), fast=True)(image)
    assert fast.shape == exact.shape
    levels = (fast - exact).abs() * torch.tensor(PreprocessConfig().std).view(3, 1, 1) * 255  # in 8-bit steps
    assert levels.max() <= 2.01 and levels.mean() < 0.5


def test_transforms_pickle():
    image = _noise(320, 240, seed=7)
    for transform in (image_transform(PreprocessConfig()), image_transform(PreprocessConfig(), train=True)):
        clone = pickle.loads(pickle.dumps(transform))
        torch.manual_seed(0)
        a = transform(image)
        torch.manual_seed(0)
        assert torch.equal(clone(image), a)


def test_core_does_not_import_torchvision():
    code = "import sys, clipworks.transforms, clipworks.data.decode; sys.exit('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize(
    "kwargs, word",
    [({"interpolation": "lanczos"}, "bicubic"), ({"resize_mode": "crop"}, "longest"), ({"image_size": 0}, "positive"),
     ({"fill_color": 300}, "fill_color"), ({"std": (0.5, 0.0, 0.5)}, "non-zero")],
)  # fmt: skip
def test_bad_config_is_refused_with_choices(kwargs, word):
    with pytest.raises(ValueError, match=word):
        image_transform(PreprocessConfig(**kwargs))


def test_non_image_input_is_refused():
    with pytest.raises(ValueError, match="PIL"):
        image_transform(PreprocessConfig())(np.zeros((10, 10, 3), np.uint8))


# Training


def test_train_matches_open_clip_under_the_same_seed():
    reference = open_clip.image_transform(224, is_train=True)
    ours = image_transform(PreprocessConfig(), train=True)
    for size in [(640, 480), (300, 1000), (224, 224), (5, 3000), (1, 1)]:
        image = _noise(*size, seed=sum(size))
        torch.manual_seed(3)
        expected = [reference(image) for _ in range(3)]
        torch.manual_seed(3)
        assert all(torch.equal(ours(image), e) for e in expected)


def test_train_is_reproducible_and_resumable():
    transform = image_transform(PreprocessConfig(), train=True, augment=AugmentConfig(hflip=0.5, color_jitter=0.3))
    image = _noise(400, 300, seed=8)
    torch.manual_seed(0)
    first = [transform(image) for _ in range(4)]
    assert all(t.shape == (3, 224, 224) and t.dtype == torch.float32 for t in first)
    assert not torch.equal(first[0], first[1])
    torch.manual_seed(0)
    transform(image), transform(image)
    state = torch.get_rng_state()  # a checkpoint taken mid-epoch ...
    torch.manual_seed(123)
    transform(image)
    torch.set_rng_state(state)  # ... and resumed
    assert torch.equal(transform(image), first[2]) and torch.equal(transform(image), first[3])


def test_crops_respect_scale_and_ratio():
    augment = AugmentConfig(scale=(0.3, 0.6), ratio=(0.5, 2.0))
    transform = image_transform(PreprocessConfig(), train=True, augment=augment)
    torch.manual_seed(0)
    width, height = 1200, 900
    for _ in range(300):
        left, top, w, h = transform.crop_box(width, height)
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
        # w and h are rounded to whole pixels: allow a pixel's worth of slack on each side
        assert 0.3 * (1 - 2 / h) <= w * h / (width * height) <= 0.6 * (1 + 2 / h)
        assert 0.5 * (1 - 2 / w) <= w / h <= 2.0 * (1 + 2 / h)


def test_default_crop_scale_is_open_clips():
    assert AugmentConfig().scale == (0.9, 1.0) and math.isclose(AugmentConfig().ratio[0], 3 / 4)


def test_flip_mirrors_the_same_crop():
    image = _noise(400, 300, seed=9)
    plain = image_transform(PreprocessConfig(), train=True)
    flipped = image_transform(PreprocessConfig(), train=True, augment=AugmentConfig(hflip=1.0))
    torch.manual_seed(5)
    a = plain(image)
    torch.manual_seed(5)
    assert torch.equal(flipped(image), a.flip(-1))


@pytest.mark.parametrize(
    "kwargs", [{"scale": (0.0, 1.0)}, {"scale": (0.9, 0.5)}, {"ratio": (2.0, 1.0)}, {"interpolation": "area"},
               {"hflip": 1.5}, {"color_jitter": 1.0}],
)  # fmt: skip
def test_bad_augment_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        AugmentConfig(**kwargs)
