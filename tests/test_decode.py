"""load_image: every documented behaviour, on files the tests write themselves."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from clipworks.data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image


def _rgb(width=24, height=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _smooth(width=64, height=48):
    y, x = np.mgrid[0:height, 0:width]
    channels = [x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)]
    return np.stack(channels, -1).astype(np.uint8)


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _reopened_mode(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        return image.mode


def _composite(rgb, alpha, background):
    rgb, alpha = rgb.astype(np.float64), alpha.astype(np.float64)[..., None]
    return np.round((rgb * alpha + np.array(background) * (255 - alpha)) / 255).astype(np.uint8)


# Sources


def test_path_bytes_and_file_object_give_the_same_rgb_image(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(_smooth()).save(path, quality=90)
    expected = np.asarray(Image.open(path).convert("RGB"))
    with open(path, "rb") as f:
        images = [load_image(path), load_image(str(path)), load_image(path.read_bytes()), load_image(f)]
    for image in images:
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected)
        assert getattr(image, "fp", None) is None  # loaded, with no file left open


# EXIF orientation

_DISPLAY = {  # orientation -> how a viewer shows the stored pixels (EXIF 2.32, 4.6.4)
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: np.rot90(np.fliplr(a), 1),  # mirror, then 270 degrees clockwise
    6: lambda a: np.rot90(a, -1),  # 90 degrees clockwise
    7: lambda a: np.rot90(np.fliplr(a), -1),  # mirror, then 90 degrees clockwise
    8: lambda a: np.rot90(a, 1),  # 270 degrees clockwise
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    stored = _rgb(6, 4, seed=orientation)  # non-square and noisy: every transposition is distinguishable
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = load_image(_save(Image.fromarray(stored), "PNG", exif=exif))
    assert np.array_equal(np.asarray(image), _DISPLAY[orientation](stored))
    assert image.getexif().get(0x0112) in (None, 1)  # cannot be applied a second time


def test_exif_orientation_of_a_jpeg():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _save(Image.fromarray(_smooth(40, 30)), "JPEG", exif=exif, quality=95)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(np.asarray(load_image(data)), np.rot90(stored, -1))


# 16-bit, float and other modes

_VALUES = np.array([0, 1, 128, 129, 385, 1000, 32767, 32768, 65279, 65407, 65408, 65535])


@pytest.mark.parametrize(
    "fmt, dtype, mode",
    [("PNG", "<u2", "I;16"), ("TIFF", "<u2", "I;16"), ("TIFF", ">u2", "I;16B"), ("TIFF", "<i4", "I")],
)
def test_16_bit_images_are_scaled_not_clipped(fmt, dtype, mode):
    values = np.concatenate([_VALUES, np.arange(0, 65536, 257 * 5)]).reshape(1, -1)
    data = _save(Image.fromarray(values.astype(dtype)), fmt)
    assert _reopened_mode(data) == mode
    out = np.asarray(load_image(data))
    expected = np.round(values / 257).astype(np.uint8)  # 1000 -> 4, 32768 -> 128, 65535 -> 255
    assert np.array_equal(out, np.repeat(expected[..., None], 3, axis=2))
    assert len(np.unique(out)) == len(np.unique(expected)) > 10  # a gradient, not saturated at 255


def test_out_of_range_32_bit_values_are_clipped():
    data = _save(Image.fromarray(np.array([[-5, 70000]], np.int32)), "TIFF")
    assert np.asarray(load_image(data))[0, :, 0].tolist() == [0, 255]


def test_float_images_are_rounded_and_clipped():
    values = np.array([[-5, 0.4, 0.6, 127.4, 254.6, 300, np.nan]], np.float32)
    data = _save(Image.fromarray(values), "TIFF")
    assert _reopened_mode(data) == "F"
    assert np.asarray(load_image(data))[0, :, 0].tolist() == [0, 0, 1, 127, 255, 255, 0]


def test_grayscale_and_bilevel_become_rgb():
    gray = _rgb()[..., 0]
    assert np.array_equal(np.asarray(load_image(_save(Image.fromarray(gray), "PNG"))), np.repeat(gray[..., None], 3, 2))
    bits = gray > 127
    data = _save(Image.fromarray(bits), "PNG")
    assert _reopened_mode(data) == "1"
    expected = np.repeat((bits * 255).astype(np.uint8)[..., None], 3, axis=2)
    assert np.array_equal(np.asarray(load_image(data)), expected)


def test_palette_becomes_rgb():
    indices = np.random.default_rng(1).integers(0, 16, (16, 24), dtype=np.uint8)
    palette = _rgb(16, 1, seed=2).reshape(-1)
    image = Image.frombytes("P", (24, 16), indices.tobytes())
    image.putpalette(palette.tolist())
    out = np.asarray(load_image(_save(image, "PNG")))
    assert np.array_equal(out, palette.reshape(-1, 3)[indices])


def test_cmyk_tiff_and_jpeg_become_rgb():
    rgb = _smooth()
    tiff = _save(Image.fromarray(rgb).convert("CMYK"), "TIFF")
    assert _reopened_mode(tiff) == "CMYK"
    assert np.array_equal(np.asarray(load_image(tiff)), rgb)  # lossless: back to the same pixels
    jpeg = _save(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert _reopened_mode(jpeg) == "CMYK"
    out = np.asarray(load_image(jpeg))
    assert np.array_equal(out, np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
    assert np.abs(out.astype(int) - rgb).mean() < 3  # lossy, but the colours survive


# Transparency


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 128, 255)])
def test_rgba_is_composited_onto_the_background(background):
    rgb, alpha = _rgb(seed=3), _rgb(seed=4)[..., 0]
    alpha[0, :4] = [0, 255, 1, 254]
    data = _save(Image.fromarray(np.dstack([rgb, alpha])), "PNG")
    out = np.asarray(load_image(data, background=background))
    assert np.array_equal(out, _composite(rgb, alpha, background))
    assert out[0, 0].tolist() == list(background) and out[0, 1].tolist() == rgb[0, 1].tolist()


def test_gray_with_alpha_is_composited():
    gray, alpha = _rgb(seed=5)[..., 0], _rgb(seed=6)[..., 0]
    data = _save(Image.fromarray(np.dstack([gray, alpha]), "LA"), "PNG")
    out = np.asarray(load_image(data, background=(10, 20, 30)))
    assert np.array_equal(out, _composite(np.repeat(gray[..., None], 3, 2), alpha, (10, 20, 30)))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_composited(fmt):
    indices = np.random.default_rng(7).integers(0, 8, (16, 24), dtype=np.uint8)
    palette = _rgb(8, 1, seed=8).reshape(-1, 3)
    image = Image.frombytes("P", (24, 16), indices.tobytes())
    image.putpalette(palette.reshape(-1).tolist())
    data = _save(image, fmt, transparency=3)  # PNG: a tRNS chunk
    expected = palette[indices]
    expected[indices == 3] = (0, 128, 255)
    assert np.array_equal(np.asarray(load_image(data, background=(0, 128, 255))), expected)


# Animations


@pytest.mark.parametrize("fmt, kwargs", [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})])
def test_animations_give_their_first_frame(fmt, kwargs):
    frames = [Image.new("RGB", (8, 6), colour) for colour in [(250, 0, 0), (0, 250, 0), (0, 0, 250)]]
    data = _save(frames[0], fmt, save_all=True, append_images=frames[1:], **kwargs)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 3
    out = np.asarray(load_image(data))
    assert out.shape == (6, 8, 3) and (out == (250, 0, 0)).all()


# Decompression bombs


def _png(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of zeros: a few KB on disk whatever width x height its header claims."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts pixel decoding: every Pillow decoder runs under ImageFile.load."""
    calls = []
    original = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


def test_bomb_is_refused_from_its_header(decode_calls):
    data = _png(8000, 8000)  # 64M pixels, under Pillow's own limits
    assert len(data) < 20_000
    with pytest.raises(ImageDecodeError, match=r"<\d+ bytes>: 8000x8000 .*max_pixels=1000000"):
        load_image(data, max_pixels=1_000_000)
    assert decode_calls == []  # the pixels were never decoded


def test_default_cap_refuses_before_pillow_warns(decode_calls, recwarn):
    with pytest.raises(ImageDecodeError, match="max_pixels"):
        load_image(_png(9000, 9000))  # 81M pixels: over our default, under Pillow's warning threshold
    assert DEFAULT_MAX_PIXELS < 9000 * 9000 < Image.MAX_IMAGE_PIXELS
    assert decode_calls == [] and len(recwarn) == 0


def test_pillow_hard_limit_is_reported_as_decode_error(decode_calls):
    with pytest.raises(ImageDecodeError, match="MAX_IMAGE_PIXELS"):
        load_image(_png(20000, 20000), max_pixels=None)  # 400M pixels: Pillow refuses in Image.open
    assert decode_calls == []


def test_cap_is_inclusive_and_can_be_disabled(decode_calls):
    data = _png(3000, 3000)
    assert load_image(data, max_pixels=None).size == (3000, 3000)  # the crafted file decodes when allowed
    assert load_image(data, max_pixels=9_000_000).size == (3000, 3000)
    assert decode_calls  # the spy sees decoding
    decode_calls.clear()
    with pytest.raises(ImageDecodeError):
        load_image(data, max_pixels=8_999_999)
    assert decode_calls == []


def test_pillow_global_state_is_untouched():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    with pytest.raises(ImageDecodeError):
        load_image(_png(3000, 3000), max_pixels=10)
    load_image(_save(Image.fromarray(_rgb()), "PNG"))
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


# Broken input


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_raise(fmt, tmp_path):
    data = _save(Image.fromarray(_rgb(200, 150)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="cut"):
        load_image(path)


def test_non_image_bytes_and_missing_files_raise(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(ImageDecodeError, match="notes.txt"):
        load_image(path)
    with pytest.raises(ImageDecodeError, match="bytes"):
        load_image(b"\x00" * 100)
    with pytest.raises(ImageDecodeError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    assert issubclass(ImageDecodeError, ValueError)


@pytest.mark.parametrize(
    "kwargs, word",
    [({"background": (256, 0, 0)}, "background"), ({"background": (0, 0)}, "background"),
     ({"max_pixels": 0}, "max_pixels"), ({"draft_size": 0}, "draft_size")],
)  # fmt: skip
def test_bad_arguments_are_refused(kwargs, word):
    with pytest.raises(ValueError, match=word):
        load_image(_save(Image.fromarray(_rgb()), "PNG"), **kwargs)


def test_bad_source_type_is_refused():
    with pytest.raises(ValueError, match="path, bytes or a binary file"):
        load_image(123)


# Draft mode


def test_draft_is_opt_in_and_keeps_both_sides_above_the_size():
    data = _save(Image.fromarray(_smooth(2000, 1500)), "JPEG", quality=90)
    assert load_image(data).size == (2000, 1500)
    small = load_image(data, draft_size=224)
    assert small.mode == "RGB" and small.size == (500, 375)  # decoded at 1/4 scale
    assert load_image(data, draft_size=1000).size == (2000, 1500)  # 1/2 would go below 1000


def test_formats_outside_the_allow_list_are_refused(tmp_path):
    path = tmp_path / "old.pcx"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, format="PCX")
    with pytest.raises(ImageDecodeError, match="accepted formats"):
        load_image(path)
    assert load_image(path, formats=None).getpixel((0, 0)) == (10, 20, 30)
    assert load_image(path, formats=("PCX",)).size == (8, 8)
