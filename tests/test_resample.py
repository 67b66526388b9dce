"""The exact fast preprocessing route: Pillow's resampling as int8 matrix products (clipworks.resample) and
JPEG decoding into arrays (clipworks.data.jpeg), checked byte for byte against Pillow and OpenCLIP."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from clipworks import resample
from clipworks.config import PreprocessConfig
from clipworks.data.decode import ImageDecodeError, load_image
from clipworks.data.jpeg import decode_jpeg_pixels, fast_jpeg_available
from clipworks.transforms import image_transform

open_clip = pytest.importorskip("open_clip")
from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: E402

FILTERS = list(resample.RESAMPLE_FILTERS)


def _pixels(width, height, seed=0, saturate=False):
    px = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if saturate:  # hard 0/255 edges drive the bicubic overshoot into both ends of the clip
        px = (px > 127).astype(np.uint8) * 255
    return px


def _photo(width, height, seed=0):
    """Smooth gradients under noise: what a camera JPEG looks like to the codec."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(0.7 * x + 0.3 * y) % 256, (x * y / 300) % 256, (0.9 * y) % 256], axis=-1)
    noise = np.random.default_rng(seed).integers(-20, 20, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _jpeg(pixels, orientation=None, **kwargs) -> bytes:
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


def test_this_build_is_exact():
    # If this fails, the fast route is silently off (callers fall back to Pillow); CI must notice.
    assert resample.exact_on_this_build()
    assert fast_jpeg_available()


@pytest.mark.parametrize("resample_filter", FILTERS, ids=["bicubic", "bilinear"])
def test_random_resizes_and_crops_equal_pillow(resample_filter):
    """Down- and upscaling, either side unchanged, both of Pillow's pass orders, any crop box."""
    rng = np.random.default_rng(int(resample_filter))
    for trial in range(120):
        width, height = (int(v) for v in rng.integers(1, 700, 2))
        new_w, new_h = (int(v) for v in rng.integers(1, 400, 2))
        if trial % 5 == 0:
            new_w = width
        if trial % 7 == 0:
            new_h = height
        x0, y0 = int(rng.integers(0, new_w)), int(rng.integers(0, new_h))
        box = (x0, y0, int(rng.integers(x0 + 1, new_w + 1)), int(rng.integers(y0 + 1, new_h + 1)))
        pixels = _pixels(width, height, seed=trial, saturate=trial % 3 == 0)
        want = np.asarray(Image.fromarray(pixels).resize((new_w, new_h), resample_filter).crop(box))
        got = resample.resize_crop_exact(pixels, (new_w, new_h), box, resample_filter)
        assert got.dtype == torch.uint8
        np.testing.assert_array_equal(got.numpy().transpose(1, 2, 0), want, err_msg=f"{(width, height)} -> {(new_w, new_h)} {box}")


def test_strided_views_are_read_as_their_pixels():
    pixels = _pixels(90, 70, seed=3)
    view = pixels[::-1].transpose(1, 0, 2)  # negative and transposed strides, as EXIF orientation makes them
    box = (2, 3, 40, 50)
    want = np.asarray(Image.fromarray(np.ascontiguousarray(view)).resize((41, 57), Image.Resampling.BICUBIC).crop(box))
    got = resample.resize_crop_exact(view, (41, 57), box, Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(got.numpy().transpose(1, 2, 0), want)


SIZES = [(1, 1), (7, 5), (224, 224), (223, 225), (333, 517), (517, 333), (640, 480), (480, 640), (1080, 1920),
         (3000, 1000), (1000, 3000), (1, 400), (400, 1)]  # fmt: skip


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode, interpolation", [("shortest", "bicubic"), ("longest", "bicubic"), ("squash", "bilinear")])
def test_from_pixels_equals_open_clip(size, mode, interpolation):
    pixels = _pixels(*size, seed=size[0] + 3 * size[1])
    cfg = PreprocessConfig(resize_mode=mode, interpolation=interpolation)
    reference = image_transform_v2(PreprocessCfg(size=224, resize_mode=mode, interpolation=interpolation), is_train=False)
    out = image_transform(cfg).from_pixels(pixels)
    assert out.dtype == torch.float32 and out.shape == (3, 224, 224)
    assert torch.equal(out, reference(Image.fromarray(pixels)))


def test_extreme_downscales_are_exact():
    # 134x and 100x: windows of ~540 and ~400 source pixels, the widest the int32 sums meet in practice.
    for pixels, size in ((_pixels(30000, 3, seed=1), (224, 3)), (_pixels(5, 22400, seed=2), (5, 224))):
        box = (0, 0, *size)
        want = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC))
        got = resample.resize_crop_exact(pixels, size, box, Image.Resampling.BICUBIC)
        np.testing.assert_array_equal(got.numpy().transpose(1, 2, 0), want)


def test_pixels_the_route_refuses_go_through_pillow(monkeypatch):
    def refuse(*args):
        raise ValueError("a window too wide for int32 sums")

    transform = image_transform(PreprocessConfig())
    pixels = _pixels(800, 500, seed=4)  # past PILLOW_FASTER_BELOW: the integer route's
    monkeypatch.setattr(resample, "resize_crop_exact", refuse)
    assert torch.equal(transform.from_pixels(pixels), transform(Image.fromarray(pixels)))


def test_small_images_are_resized_by_pillow_and_large_ones_by_the_integer_route(monkeypatch):
    from clipworks.transforms import PILLOW_FASTER_BELOW

    calls = []
    real = resample.resize_crop_exact
    monkeypatch.setattr(resample, "resize_crop_exact", lambda *a: calls.append(a[0].shape) or real(*a))
    transform = image_transform(PreprocessConfig())
    for w, h in ((256, 256), (640, 480)):
        pixels = _pixels(w, h, seed=w)
        assert torch.equal(transform.from_pixels(pixels), transform(Image.fromarray(pixels)))
    assert 256 * 256 < PILLOW_FASTER_BELOW <= 640 * 480 and calls == [(480, 640, 3)]


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
def test_load_equals_load_image_for_every_exif_orientation(mode):
    transform = image_transform(PreprocessConfig(resize_mode=mode))
    pixels = _photo(301, 420)
    for orientation in range(1, 9):
        data = _jpeg(pixels, orientation, quality=90)
        assert decode_jpeg_pixels(data, None, None) is not None  # the fast route is taken
        assert torch.equal(transform.load(data), transform(load_image(data))), orientation


def _other_files(pixels):
    cmyk = io.BytesIO()
    Image.fromarray(pixels).convert("CMYK").save(cmyk, "JPEG")
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, "PNG")
    return {
        "baseline": (_jpeg(pixels, quality=90), True),
        "progressive": (_jpeg(pixels, quality=80, progressive=True), True),
        "4:4:4": (_jpeg(pixels, quality=95, subsampling=0), True),
        "4:2:2": (_jpeg(pixels, quality=70, subsampling=1), True),
        "grayscale": (_jpeg(pixels[:, :, 0]), False),
        "cmyk": (cmyk.getvalue(), False),
        "png": (png.getvalue(), False),
    }


def test_load_equals_load_image_for_every_kind_of_file_and_source(tmp_path):
    transform = image_transform(PreprocessConfig())
    for name, (data, fast) in _other_files(_photo(257, 190)).items():
        assert (decode_jpeg_pixels(data, None, None) is not None) == fast, name
        path = tmp_path / name
        path.write_bytes(data)
        want = transform(load_image(path))
        with open(path, "rb") as stream:
            for source in (data, path, str(path), stream):
                assert torch.equal(transform.load(source), want), (name, type(source).__name__)


def test_load_refuses_what_load_image_refuses(tmp_path):
    transform = image_transform(PreprocessConfig())
    data = _jpeg(_photo(200, 150))
    for broken in (data[: len(data) // 2], data[:-20]):
        with pytest.raises(ImageDecodeError, match="truncated"):
            transform.load(broken)
    with pytest.raises(ImageDecodeError, match="max_pixels"):
        transform.load(data, max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="accepted formats"):
        transform.load(data, formats=("PNG",))
    with pytest.raises(ImageDecodeError, match="No such file"):
        transform.load(tmp_path / "missing.jpg")
    stream = io.BytesIO(b"not an image")
    stream.name = "notes.jpg"
    with pytest.raises(ImageDecodeError, match="notes.jpg"):
        transform.load(stream)


def test_fast_transform_keeps_its_own_route():
    transform = image_transform(PreprocessConfig(), fast=True)
    data = _jpeg(_photo(640, 480))
    assert torch.equal(transform.load(data), transform(load_image(data)))


def test_scratch_decodes_reuse_one_buffer_per_thread(monkeypatch):
    import threading

    from clipworks.data import jpeg

    first, second = _jpeg(_photo(120, 90, seed=1)), _jpeg(_photo(90, 120, seed=2))
    want = [decode_jpeg_pixels(d, None, None).copy() for d in (first, second)]
    a = decode_jpeg_pixels(first, None, None, scratch=True)
    np.testing.assert_array_equal(a, want[0])
    b = decode_jpeg_pixels(second, None, None, scratch=True)
    np.testing.assert_array_equal(b, want[1])
    assert np.shares_memory(a, b)  # the same buffer: `a` is no longer valid, as documented
    other = []
    thread = threading.Thread(target=lambda: other.append(decode_jpeg_pixels(first, None, None, scratch=True)))
    thread.start()
    thread.join()
    assert not np.shares_memory(other[0], b)  # each thread its own buffer
    monkeypatch.setattr(jpeg, "SCRATCH_BYTES", 1000)  # above the cap: a fresh array each time
    c = decode_jpeg_pixels(first, None, None, scratch=True)
    assert not np.shares_memory(c, b) and not np.shares_memory(c, decode_jpeg_pixels(first, None, None, scratch=True))
