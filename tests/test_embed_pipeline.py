"""The embed pipeline: busy/wait statistics, batches cast to a low-precision model's dtype, where a CPU job
encodes, and the opt-in device JPEG route (`gpu_decode`) on whatever device there is."""

from __future__ import annotations

import copy
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from reference import tiny_config

import clipworks
from clipworks.data.jpeg import decode_preprocess_batch, gpu_decodable, resize_crop_batch
from clipworks.search import pipeline
from clipworks.search.embed import default_batch_size, describe, embed_collection, input_dtype, summary_dict
from clipworks.search.store import read_embeddings
from clipworks.transforms import image_transform

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.fixture(scope="module")
def tiny():
    """A tiny random ViT and its evaluation transform."""
    torch.manual_seed(0)
    model = clipworks.create_model(tiny_config(clipworks.get_preset("ViT-B-32"))).eval()
    return model, image_transform(model.preprocess_config)


def _jpeg(pixels: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def _smooth(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like gradient with noise (uint8 (H, W, 3)): what resampling filters are judged on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin((c + 1) * x / width * 3 + y / height * (2 + c)) for c in range(3)], axis=-1)
    return np.clip(base + rng.normal(0, 4, (height, width, 1)), 0, 255).astype(np.uint8)


def _folder(root, sizes=((90, 120), (64, 64), (200, 150), (40, 300), (77, 59))):
    root.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        (root / f"p{i}.jpg").write_bytes(_jpeg(_smooth(h, w, i)))
    Image.fromarray(_smooth(50, 70, 9)).save(root / "q.png")  # not a JPEG: the exact route
    return root


def _run(tiny, data, out, model=None, **kw):
    m, preprocess = tiny
    kw.setdefault("workers", 0)
    return embed_collection(model or m, data, out, model_name="tiny", transform=preprocess, batch_size=4,
                            progress=False, dtype="float32", **kw)  # fmt: skip


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# --- statistics -----------------------------------------------------------------------------------------------


def test_stats_account_for_the_encoding_in_this_process(tiny, tmp_path):
    result = _run(tiny, f"folder:{_folder(tmp_path / 'photos')}", tmp_path / "emb")
    s = result.stats
    assert s is not None and (s.encoders, s.batches) == (1, 2)  # 6 images in batches of 4
    assert 0 < s.encode_seconds <= s.wall_seconds and 0 <= s.wait_seconds <= s.wall_seconds
    assert 0 < s.busy_fraction <= 1
    assert summary_dict(result)["stats"]["batches"] == 2
    assert "the model was busy" in describe(result)
    again = _run(tiny, f"folder:{tmp_path / 'photos'}", tmp_path / "emb")  # a resume with nothing left
    assert again.stats is None and again.shards_resumed == 1


def test_stats_sum_the_workers_encoding_when_they_encode(tiny, tmp_path):
    result = _run(tiny, f"folder:{_folder(tmp_path / 'photos')}", tmp_path / "emb", workers=2, encode_in="workers")
    s = result.stats
    assert (s.encoders, s.batches) == (2, 2) and s.encode_seconds > 0 and 0 < s.busy_fraction <= 1


def test_encode_in_is_checked(tiny, tmp_path):
    data = f"folder:{_folder(tmp_path / 'photos')}"
    with pytest.raises(ValueError, match="encode_in"):
        _run(tiny, data, tmp_path / "a", encode_in="gpu")
    with pytest.raises(ValueError, match="workers >= 1"):
        _run(tiny, data, tmp_path / "b", encode_in="workers", workers=0)


def test_encode_in_main_keeps_the_workers_to_decoding(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_cores", lambda: 2)  # two workers would encode under "auto"
    here = []
    real = pipeline._encode_images
    monkeypatch.setattr(pipeline, "_encode_images", lambda *a: here.append(1) or real(*a))
    data = f"folder:{_folder(tmp_path / 'photos')}"
    result = _run(tiny, data, tmp_path / "main", workers=2, encode_in="main")
    assert len(here) == 2 and result.stats.encoders == 1
    a, ra, _ = read_embeddings(tmp_path / "main")
    b, rb, _ = read_embeddings(_run(tiny, data, tmp_path / "here").out)
    assert ra == rb
    np.testing.assert_allclose(a, b, atol=1e-6)


# --- precision --------------------------------------------------------------------------------------------------


def test_input_dtype_follows_the_image_towers_weights(tiny):
    model, _ = tiny
    assert input_dtype(model) == torch.float32
    assert input_dtype(copy.deepcopy(model).to(torch.bfloat16)) == torch.bfloat16
    from clipworks.models.quant import quantize_int8

    assert input_dtype(quantize_int8(copy.deepcopy(model))) == torch.float32  # its int8 layers take float32


@pytest.mark.parametrize("encode_in,workers", [("main", 0), ("workers", 2)])
def test_a_bf16_model_gets_bf16_batches_and_close_embeddings(tiny, tmp_path, encode_in, workers):
    data = f"folder:{_folder(tmp_path / 'photos')}"
    exact, records, _ = read_embeddings(_run(tiny, data, tmp_path / "fp32").out)
    low = copy.deepcopy(tiny[0]).to(torch.bfloat16)  # the whole model: only bf16 inputs work
    result = _run(tiny, data, tmp_path / "bf16", model=low, encode_in=encode_in, workers=workers)
    got, got_records, manifest = read_embeddings(result.out)
    assert got_records == records and manifest["dtype"] == "float32" and got.dtype == np.float32
    assert _cosines(got, exact).min() >= 0.999
    assert '"precision": "bfloat16"' in (result.out / "job.json").read_text()
    with pytest.raises(ValueError, match="precision"):  # a resume must not mix bf16 and fp32 embeddings
        _run(tiny, data, tmp_path / "bf16")


def test_default_batch_size_by_device():
    assert default_batch_size(torch.device("cuda")) == 256 and default_batch_size(torch.device("cpu")) == 64


# --- the device JPEG route ------------------------------------------------------------------------------------


def test_gpu_decodable_takes_plain_jpegs_only():
    pixels = _smooth(40, 30, 0)
    assert gpu_decodable(_jpeg(pixels)) and gpu_decodable(_jpeg(pixels[:, :, 0]))  # RGB and grayscale
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: nvJPEG would not turn it
    cmyk = io.BytesIO()
    Image.fromarray(pixels).convert("CMYK").save(cmyk, "JPEG")
    assert not any(gpu_decodable(d) for d in (png.getvalue(), _jpeg(pixels, exif=exif), cmyk.getvalue(), b"junk"))
    assert not gpu_decodable(_jpeg(pixels), max_pixels=100)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_resize_crop_batch_follows_the_exact_transform(device, resize_mode):
    from clipworks.config import PreprocessConfig

    cfg = PreprocessConfig(image_size=32, resize_mode=resize_mode, fill_color=7)
    exact = image_transform(cfg)
    arrays = [_smooth(h, w, i) for i, (h, w) in enumerate(((90, 120), (90, 120), (20, 25), (300, 40), (32, 32)))]
    arrays[1] = arrays[0].copy()
    images = [torch.from_numpy(a).permute(2, 0, 1).to(device) for a in arrays]  # (3, H, W) uint8
    got = resize_crop_batch(images, cfg)
    want = torch.stack([exact(Image.fromarray(a)) for a in arrays])
    assert got.shape == (5, 3, 32, 32) and got.device.type == device and got.dtype == torch.float32
    got = got.cpu()
    torch.testing.assert_close(got[0], got[1])  # the two equal-size images went through one resize
    np.testing.assert_array_equal(got[4].numpy(), want[4].numpy())  # no resize: the same pixels
    # Pillow resamples in fixed point, torch in floating point: a level or two of 255 apart at most
    assert (got - want).abs().max() <= 3 / 255 / min(cfg.std) + 1e-6
    assert _cosines(got.flatten(1).numpy(), want.flatten(1).numpy()).min() > 0.999


@pytest.mark.parametrize("device", DEVICES)
def test_decode_preprocess_batch_reports_the_files_it_cannot_decode(device):
    from clipworks.config import PreprocessConfig

    cfg = PreprocessConfig(image_size=24)
    files = [_jpeg(_smooth(40, 50, 0)), _jpeg(_smooth(40, 50, 1))[:300], _jpeg(_smooth(33, 21, 2))]
    jpegs = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in files]
    pixels, failed = decode_preprocess_batch(jpegs, cfg, torch.device(device))
    assert failed == [1] and pixels.shape == (2, 3, 24, 24) and pixels.device.type == device
    none, failed = decode_preprocess_batch(jpegs[1:2], cfg, torch.device(device))
    assert failed == [0] and none.shape == (0, 3, 24, 24)


def _gpu_decode_matches_the_exact_route(tiny, tmp_path, data, device):
    model = copy.deepcopy(tiny[0]).to(device)
    exact, records, _ = read_embeddings(_run(tiny, data, tmp_path / "exact").out)
    result = _run(tiny, data, tmp_path / "gpu", model=model, gpu_decode=True, workers=2)
    got, got_records, _ = read_embeddings(result.out)
    assert [r["key"] for r in got_records] == [r["key"] for r in records]
    assert _cosines(got, exact).min() > 0.999
    return result


@pytest.mark.parametrize("device", DEVICES)
def test_gpu_decode_embeds_a_folder_close_to_the_exact_route(tiny, tmp_path, device):
    photos = _folder(tmp_path / "photos")
    (photos / "cut.jpg").write_bytes(_jpeg(_smooth(60, 60, 5))[:400])  # its header reads: the device fails on it
    result = _gpu_decode_matches_the_exact_route(tiny, tmp_path, f"folder:{photos}", device)
    assert result.skipped == 1 and "cut.jpg\t" in (result.out / "skipped.txt").read_text()
    assert '"gpu_decode": true' in (result.out / "job.json").read_text()


@pytest.mark.parametrize("device", DEVICES)
def test_gpu_decode_embeds_webdataset_shards(tiny, tmp_path, device):
    tar = tmp_path / "00000.tar"
    with tarfile.open(tar, "w") as t:
        for i in range(7):
            for ext, data in (("jpg", _jpeg(_smooth(64, 64, i))), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    _gpu_decode_matches_the_exact_route(tiny, tmp_path, f"wds:{tar}", device)


def test_gpu_decode_is_refused_where_it_does_not_apply(tiny, tmp_path):
    data = f"folder:{_folder(tmp_path / 'photos')}"
    with pytest.raises(ValueError, match="gpu_decode"):
        _run(tiny, data, tmp_path / "a", gpu_decode=True, fast_decode=True)
    with pytest.raises(ValueError, match="evaluation transform"):
        embed_collection(tiny[0], data, tmp_path / "b", model_name="tiny", transform=lambda image: image,
                         gpu_decode=True, progress=False)  # fmt: skip


# --- uint8 pixels from the workers (GPU jobs) -------------------------------------------------------------------


@pytest.mark.parametrize("mean,std", [((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                                      ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])  # fmt: skip
def test_uint8_pixels_round_trip_exactly(mean, std):
    from clipworks.config import PreprocessConfig
    from clipworks.search.sources import normalise, to_uint8

    cfg = PreprocessConfig(image_size=16, mean=mean, std=std)
    pixels = torch.arange(256, dtype=torch.uint8).repeat(6).view(2, 3, 16, 16)  # every level in every channel
    exact = torch.stack([image_transform(cfg)._planes_to_tensor(p) for p in pixels])  # EvalTransform's own steps
    assert torch.equal(to_uint8(exact, cfg), pixels)
    assert torch.equal(normalise(to_uint8(exact, cfg), cfg), exact)


def test_a_job_fed_uint8_pixels_stores_the_same_embeddings(tiny, tmp_path, monkeypatch):
    data = f"folder:{_folder(tmp_path / 'photos')}"
    exact, records, _ = read_embeddings(_run(tiny, data, tmp_path / "float").out)
    seen = []
    real = pipeline._uint8_config
    monkeypatch.setattr(pipeline, "_uint8_config", lambda device, t: seen.append(1) or real(torch.device("cuda"), t))
    got, got_records, _ = read_embeddings(_run(tiny, data, tmp_path / "uint8", workers=2, encode_in="main").out)
    assert seen and got_records == records
    np.testing.assert_array_equal(got, exact)
