"""Single-file checkpoints' text encoders (SD 1.x/2.x/XL, SD3, Flux) against diffusers' single-file loading, on
tiny random towers written under each family's prefixes beside fake UNet/VAE tensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from clipworks.checkpoints.io import CheckpointError
from clipworks.conditioning import (
    PromptReader,
    SDXLText,
    StableDiffusionText,
    inspect_single_file,
    load_sdxl_text,
    load_single_file_t5_weights,
    load_single_file_text_encoders,
    load_stable_diffusion_text,
    text_encoder_from_transformers,
)

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
open_clip = pytest.importorskip("open_clip")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

VOCAB = 49408  # the real vocabulary, so the pipelines' tokenizer runs on these towers
# Heads are width / 64 in every released tower, and that is what a single file's shapes are read with.
L_WIDTH, G_WIDTH, LAYERS = 64, 128, 3
UNET_VAE = {
    "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
    "model.diffusion_model.out.2.bias": torch.randn(4),
    "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3),
    "first_stage_model.decoder.conv_out.bias": torch.randn(3),
}
DIT = {"sd3": "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
       "flux": "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale"}  # fmt: skip


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # norms and biases off their init, so no swapped key passes
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def hf_config(width: int, act: str, layers: int = LAYERS, projection_dim: int | None = None):
    # eos_token_id=2: transformers' legacy argmax pooling, as the released SD towers' configs have
    return transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=4 * width,
                                       num_hidden_layers=layers, num_attention_heads=width // 64, hidden_act=act,
                                       projection_dim=projection_dim or width, eos_token_id=2)  # fmt: skip


def hf_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A transformers text model's keys as single files hold them (with `text_model.`, which transformers 5 drops)."""
    sd = model.state_dict()
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in sd.items()}


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    clip_l = _perturb(transformers.CLIPTextModel(hf_config(L_WIDTH, "quick_gelu")), 1)
    clip_g = _perturb(transformers.CLIPTextModelWithProjection(hf_config(G_WIDTH, "gelu", projection_dim=32)), 2)
    make = open_clip.transformer.TextTransformer
    vit_h = _perturb(make(vocab_size=VOCAB, width=G_WIDTH, heads=2, layers=LAYERS, output_dim=G_WIDTH), 3)
    big_g = _perturb(make(vocab_size=VOCAB, width=G_WIDTH, heads=2, layers=LAYERS, output_dim=32), 4)
    t5_config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                      feed_forward_proj="gated-gelu")  # T5 v1.1's, as SD3's and Flux's T5-XXL
    t5 = _perturb(transformers.T5EncoderModel(t5_config), 5)
    return {"clip_l": clip_l, "clip_g": clip_g, "vit_h": vit_h, "big_g": big_g, "t5": t5}


def single_file(towers, family: str) -> dict[str, torch.Tensor]:
    """A family's single-file state dict: its text encoders under their prefixes, plus fake UNet/VAE tensors."""
    l_sd, g_sd = hf_weights(towers["clip_l"]), hf_weights(towers["clip_g"])
    t5 = towers["t5"].state_dict()
    parts = {
        "sd1": {"cond_stage_model.transformer.": l_sd},
        "sd2": {"cond_stage_model.model.": towers["vit_h"].state_dict()},
        "sdxl": {"conditioner.embedders.0.transformer.": l_sd,
                 "conditioner.embedders.1.model.": {**towers["big_g"].state_dict(), "logit_scale": torch.ones([])}},
        "sd3": {"text_encoders.clip_l.transformer.": l_sd, "text_encoders.clip_g.transformer.": g_sd,
                "text_encoders.t5xxl.transformer.": t5},
        "flux": {"text_encoders.clip_l.transformer.": l_sd, "text_encoders.t5xxl.transformer.": t5},
    }[family]  # fmt: skip
    out = {f"{p}{k}": v.detach().clone().contiguous() for p, sd in parts.items() for k, v in sd.items()}
    out.update(UNET_VAE)
    if family in DIT:
        out[DIT[family]] = torch.randn(8)
    return out


@pytest.fixture(scope="module")
def files(towers, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    paths = {}
    for family in ("sd1", "sd2", "sdxl", "sd3", "flux"):
        paths[family] = root / f"{family}.safetensors"
        save_file(single_file(towers, family), str(paths[family]))
    return paths


def diffusers_tower(cls, config, path, tmp_path):
    """diffusers' own single-file text encoder: `create_diffusers_clip_model_from_ldm` on the file's tensors, with
    a local config (offline). It loads with strict=False (no accelerate), so the test checks every parameter came
    from the file: the conversion's output must cover the model's state dict."""
    config.save_pretrained(tmp_path)
    checkpoint = load_file(str(path))
    model = sfu.create_diffusers_clip_model_from_ldm(cls, checkpoint, config=str(tmp_path), local_files_only=True)
    return model.eval()


def tokens(n: int = 3, length: int = 77, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB - 2, (n, length), generator=g)
    ids[:, 0] = VOCAB - 2
    for i, end in enumerate((5, 20, length - 1)[:n]):  # the end token (the highest id) at varied positions
        ids[i, end] = VOCAB - 1
    return ids


@torch.no_grad()
def assert_same(ours, theirs, ids: torch.Tensor, projected: bool) -> float:
    """Every hidden state, the final-normed states and the pooled output agree; returns the largest difference."""
    out = theirs(ids, output_hidden_states=True)
    mine = ours.forward_hidden(ids)
    assert len(mine.hidden_states) == len(out.hidden_states)
    pairs = [*zip(mine.hidden_states, out.hidden_states), (mine.last_hidden, out.last_hidden_state),
             (mine.pooled, out.text_embeds if projected else out.pooler_output)]  # fmt: skip
    diff = max(float((a - b).abs().max()) for a, b in pairs)
    assert diff < 1e-5, diff
    return diff


def check_covered(model, converted: dict) -> None:
    keys = {k.removeprefix("text_model.") for k in converted}
    own = {k.removeprefix("text_model.") for k in model.state_dict() if not k.endswith("position_ids")}
    assert own <= keys, sorted(own - keys)[:5]


@pytest.mark.parametrize(
    "family, encoders",
    [("sd1", ("text_encoder",)), ("sd2", ("text_encoder",)), ("sdxl", ("text_encoder", "text_encoder_2")),
     ("sd3", ("clip_l", "clip_g", "t5")), ("flux", ("clip_l", "t5"))],
)  # fmt: skip
def test_family_detection(files, family, encoders):
    info = inspect_single_file(files[family])
    assert (info.family, info.encoders) == (family, encoders)


def test_refiner_and_sd3_without_clip_g(towers, tmp_path):
    """SDXL's refiner (bigG alone, under embedders.0) against diffusers; an SD3 file without clip_g is told from
    Flux by its DiT's keys."""
    path = tmp_path / "refiner.safetensors"
    bigg = {f"conditioner.embedders.0.model.{k}": v.contiguous() for k, v in towers["big_g"].state_dict().items()}
    save_file({**bigg, **UNET_VAE}, str(path))
    info = inspect_single_file(path)
    assert (info.family, info.encoders) == ("sdxl_refiner", ("text_encoder_2",))
    config = hf_config(G_WIDTH, "gelu", projection_dim=32)
    theirs = diffusers_tower(transformers.CLIPTextModelWithProjection, config, path, tmp_path / "d")
    assert_same(load_single_file_text_encoders(path)["text_encoder_2"], theirs, tokens(), projected=True)
    sd = {k: v for k, v in single_file(towers, "sd3").items() if not k.startswith("text_encoders.clip_g.")}
    save_file(sd, str(tmp_path / "sd3.safetensors"))
    assert inspect_single_file(tmp_path / "sd3.safetensors").encoders == ("clip_l", "t5")
    assert inspect_single_file(tmp_path / "sd3.safetensors").family == "sd3"


def test_sd1_matches_diffusers(files, tmp_path):
    ours = load_single_file_text_encoders(files["sd1"])["text_encoder"]
    theirs = diffusers_tower(transformers.CLIPTextModel, hf_config(L_WIDTH, "quick_gelu"), files["sd1"], tmp_path)
    check_covered(theirs, sfu.convert_ldm_clip_checkpoint(load_file(str(files["sd1"]))))
    assert_same(ours, theirs, tokens(), projected=False)


def test_sd2_matches_diffusers_penultimate(files, tmp_path):
    """SD 2.x: the file's last block and projection are dropped, as diffusers' 23-of-24-layer text encoder does."""
    ours = load_single_file_text_encoders(files["sd2"])["text_encoder"]
    assert ours.config.layers == LAYERS - 1 and ours.config.act == "gelu"
    config = hf_config(G_WIDTH, "gelu", layers=LAYERS - 1)
    theirs = diffusers_tower(transformers.CLIPTextModel, config, files["sd2"], tmp_path)
    sd = load_file(str(files["sd2"]))
    check_covered(theirs, sfu.convert_open_clip_checkpoint(theirs, sd, prefix="cond_stage_model.model."))
    assert_same(ours, theirs, tokens(), projected=False)


def test_sdxl_matches_diffusers(files, tmp_path):
    ours = load_single_file_text_encoders(files["sdxl"])
    te1 = diffusers_tower(transformers.CLIPTextModel, hf_config(L_WIDTH, "quick_gelu"), files["sdxl"], tmp_path / "1")
    config_2 = hf_config(G_WIDTH, "gelu", projection_dim=32)
    te2 = diffusers_tower(transformers.CLIPTextModelWithProjection, config_2, files["sdxl"], tmp_path / "2")
    sd = load_file(str(files["sdxl"]))
    check_covered(te2, sfu.convert_open_clip_checkpoint(te2, sd, prefix="conditioner.embedders.1.model."))
    assert_same(ours["text_encoder"], te1, tokens(), projected=False)
    assert_same(ours["text_encoder_2"], te2, tokens(), projected=True)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sd3_flux_clip_match_diffusers(files, tmp_path, family):
    ours = load_single_file_text_encoders(files[family])
    assert set(ours) == ({"clip_l", "clip_g", "t5"} if family == "sd3" else {"clip_l", "t5"})
    # SD3's pipeline holds clip_l as CLIPTextModelWithProjection; diffusers gives it an identity projection
    cls = transformers.CLIPTextModelWithProjection if family == "sd3" else transformers.CLIPTextModel
    clip_l = diffusers_tower(cls, hf_config(L_WIDTH, "quick_gelu"), files[family], tmp_path / "l")
    assert_same(ours["clip_l"], clip_l, tokens(), projected=family == "sd3")
    if family == "sd3":
        config_g = hf_config(G_WIDTH, "gelu", projection_dim=32)
        clip_g = diffusers_tower(transformers.CLIPTextModelWithProjection, config_g, files[family], tmp_path / "g")
        assert_same(ours["clip_g"], clip_g, tokens(), projected=True)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@torch.no_grad()
def test_t5_matches_diffusers(files, towers, tmp_path, family):
    """clipworks' T5 encoder (config read from shapes) against diffusers' `create_diffusers_t5_model_from_checkpoint`
    (a transformers T5EncoderModel, local config), last hidden state."""
    ours = load_single_file_text_encoders(files[family])["t5"]
    towers["t5"].config.save_pretrained(tmp_path)
    theirs = sfu.create_diffusers_t5_model_from_checkpoint(transformers.T5EncoderModel, load_file(str(files[family])),
                                                           config=str(tmp_path), local_files_only=True).eval()
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    diff = float((ours(ids) - theirs(ids).last_hidden_state).abs().max())
    assert diff < 1e-5, diff


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_t5_weights_are_diffusers_conversion(files, towers, family):
    """The T5 tensors equal diffusers' `convert_sd3_t5_checkpoint_to_diffusers` output, and a transformers
    T5EncoderModel loads them strictly."""
    ours = load_single_file_t5_weights(files[family])
    theirs = sfu.convert_sd3_t5_checkpoint_to_diffusers(load_file(str(files[family])))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    transformers.T5EncoderModel(towers["t5"].config).load_state_dict(ours, strict=True)
    with pytest.raises(CheckpointError, match="no T5 encoder"):
        load_single_file_t5_weights(files["sdxl"])


def test_convenience_pipelines(files, towers):
    """`load_stable_diffusion_text` / `load_sdxl_text` give what the same towers give when built from the live
    models (whose pipelines match diffusers' encode_prompt: test_conditioning_parity.py)."""
    reader = PromptReader(syntax="plain", truncate=True)
    sd1 = load_stable_diffusion_text(files["sd1"], reader)
    ref = StableDiffusionText(text_encoder_from_transformers(towers["clip_l"]), reader)
    a, b = sd1("a red fox", "blurry"), ref("a red fox", "blurry")
    assert torch.allclose(a.embeds, b.embeds, atol=1e-5) and torch.allclose(a.negative_embeds, b.negative_embeds,
                                                                            atol=1e-5)  # fmt: skip
    assert load_stable_diffusion_text(files["sd2"]).pad_id == 0
    xl = load_sdxl_text(files["sdxl"], reader)
    assert isinstance(xl, SDXLText)
    c = xl("a red fox")
    assert c.embeds.shape == (1, 77, L_WIDTH + G_WIDTH) and c.pooled.shape == (1, 32)
    with pytest.raises(CheckpointError, match="use load_sdxl_text"):
        load_stable_diffusion_text(files["sdxl"])
    with pytest.raises(CheckpointError, match="needs an sdxl file"):
        load_sdxl_text(files["sd1"])


def test_dtype_and_ckpt(files, towers, tmp_path):
    """A `.ckpt` of a plain dict loads through weights_only=True and gives the same tower; dtype= casts."""
    sd = single_file(towers, "sd1")
    path = tmp_path / "sd1.ckpt"
    torch.save({"state_dict": sd, "global_step": 7, "epoch": 1}, path)
    assert inspect_single_file(path).family == "sd1"
    a = load_single_file_text_encoders(path)["text_encoder"]
    b = load_single_file_text_encoders(files["sd1"])["text_encoder"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    half = load_single_file_text_encoders(files["sd1"], dtype=torch.float16)["text_encoder"]
    assert {p.dtype for p in half.parameters()} == {torch.float16}


class Callback:  # a pickled class: what weights_only=True must refuse
    pass


def test_refusals(towers, tmp_path):
    path = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": single_file(towers, "sd1"), "callbacks": Callback()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True") as e:
        load_single_file_text_encoders(path)
    assert "\n" not in str(e.value)
    empty = tmp_path / "unet_only.safetensors"
    save_file(UNET_VAE, str(empty))
    with pytest.raises(CheckpointError, match="no text encoder found") as e:
        inspect_single_file(empty)
    assert "cond_stage_model.transformer." in str(e.value) and "text_encoders.t5xxl.transformer." in str(e.value)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        (tmp_path / "x.gguf").write_bytes(b"0")
        inspect_single_file(tmp_path / "x.gguf")
