"""The interface every preset keeps, checked at a tiny size: shapes, norms, gradients, checkpointing."""

import pytest
import torch

import clipworks
from clipworks.models.clip import CLIP
from reference import perturb_, tiny_config

PRESETS = clipworks.list_models()


def _batch(cfg, B=2):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    L = cfg.text.context_length
    if cfg.text.kind != "transformer":  # a Hugging Face encoder: [<s>] text </s>, then its own padding id
        pad = cfg.text.pad_id
        start, end = ([], [1]) if pad == 0 else ([0], [2])  # mT5's tokenizer has no start token; pads with 0
        tokens = torch.full((B, L), pad)
        for i, n in enumerate([5, 9][:B]):
            ids = [*start, *torch.randint(3, 1000, (n,), generator=g).tolist(), *end]
            tokens[i, : len(ids)] = torch.tensor(ids)
        return images, tokens
    tokens = torch.zeros(B, L, dtype=torch.long)
    for i, n in enumerate([5, 9][:B]):  # real-looking sequences: start, n ids, end, padding
        tokens[i, 0] = 49406 % cfg.text.vocab_size
        tokens[i, 1 : n + 1] = torch.randint(1, min(cfg.text.vocab_size, 49406) - 1, (n,), generator=g)
        tokens[i, n + 1] = cfg.text.vocab_size - 1  # the highest id pools, as CLIP's end token does
    return images, tokens


@pytest.mark.parametrize("name", PRESETS)
def test_preset_contract(name):
    cfg = tiny_config(clipworks.get_preset(name))
    torch.manual_seed(0)
    model = CLIP(cfg)
    # Zero-initialised gates (ResNet's last BatchNorm gain per block) block gradients at init by design:
    # random values everywhere make "every parameter is reached by the loss" observable.
    perturb_(model, std=0.05)
    images, tokens = _batch(cfg)

    model.train()
    out = model(images, tokens)
    assert out.image_features.shape == (2, cfg.embed_dim)
    assert out.text_features.shape == (2, cfg.embed_dim)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out.text_features.norm(dim=-1), torch.ones(2))

    logits, _ = out.logits()
    loss = (logits.logsumexp(-1) - logits.diag()).mean() + 1e-3 * logits.square().mean()  # reaches logit_bias too
    hidden = model.encode_text_hidden(tokens)
    loss = loss + hidden.hidden_states[1].mean()  # reach every text block through the hidden-state path too
    if model.decoder is not None:  # CoCa's caption decoder, which the contrastive loss does not reach
        loss = loss + 1e-3 * model.caption_logits(images, tokens).square().mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


@pytest.mark.parametrize("name", PRESETS)
def test_grad_checkpointing_same_output_and_grads(name):
    cfg = tiny_config(clipworks.get_preset(name))
    if cfg.vision.kind in ("convnext", "timm"):  # stochastic depth differs between runs: compare without it
        from dataclasses import replace

        cfg = replace(cfg, vision=replace(cfg.vision, drop_path=0.0))
    torch.manual_seed(0)
    model = CLIP(cfg).train()
    images, tokens = _batch(cfg)

    def run():
        model.zero_grad()
        img, txt = model.encode_image(images), model.encode_text(tokens)
        loss = img.square().sum() + txt.square().sum()
        if model.decoder is not None:  # CoCa: the caption decoder checkpoints its blocks too
            loss = loss + model.caption_logits(images, tokens).square().mean()
        loss.backward()
        return img.detach(), txt.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = run()
    model.set_grad_checkpointing(True)
    ckpt = run()
    torch.testing.assert_close(ckpt[0], plain[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ckpt[1], plain[1], rtol=0, atol=1e-6)
    for n in plain[2]:
        torch.testing.assert_close(ckpt[2][n], plain[2][n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50", "convnext_base_w", "ViT-B-16-SigLIP"])
def test_config_round_trips_through_dict(name):
    cfg = clipworks.get_preset(name)
    assert clipworks.CLIPConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_config_key_is_named():
    d = clipworks.get_preset("ViT-B-32").to_dict()
    d["vision"]["widht"] = 3
    with pytest.raises(ValueError, match="widht"):
        clipworks.CLIPConfig.from_dict(d)


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match="ViT-B-32"):
        clipworks.create_model("ViT-B-23")
