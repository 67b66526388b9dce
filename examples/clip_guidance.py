"""Nudge an image toward a prompt with CLIP guidance: gradient steps on the pixels lower the guidance loss.

Usage: python examples/clip_guidance.py [--prompt "a red circle"] [--steps 20] [--model MODEL] [--out image.png]

With no --model a tiny randomly initialised CLIP is used (nothing is downloaded): the loss falls all the same,
though the picture means nothing. Give a real model (`--model ViT-B-32:openai`, `--model local-dir:DIR`) to see
the image move toward the prompt.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from clipworks import create_model, get_preset, get_tokenizer
from clipworks.conditioning import CLIPGuidance


def tiny_model() -> torch.nn.Module:
    """A ViT-B-32-shaped CLIP at a few thousandths of its size, with random weights."""
    cfg = get_preset("ViT-B-32")
    vision = replace(cfg.vision, image_size=64, patch_size=16, width=64, heads=2, layers=2)
    text = replace(cfg.text, width=64, heads=2, layers=2)
    return create_model(replace(cfg, embed_dim=32, vision=vision, text=text))


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("--model", default=None, help="anything create_model takes; default a tiny random CLIP")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--size", type=int, default=96, help="side of the image being optimised, in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the final image here (PNG)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = tiny_model() if args.model is None else create_model(args.model)
    model.requires_grad_(False)  # only the pixels are optimised
    with torch.no_grad():
        text = model.encode_text(get_tokenizer(model)(args.prompt))
    guidance = CLIPGuidance(model, text[0])

    # Optimise unconstrained logits; the sigmoid keeps pixels in [0, 1].
    logits = torch.randn(1, 3, args.size, args.size).mul_(0.5).requires_grad_()
    optimiser = torch.optim.Adam([logits], lr=args.lr)
    losses = []
    for step in range(args.steps):
        loss = guidance(logits.sigmoid())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        print(f"step {step:3d}  guidance loss {loss.item():.4f}")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} toward {args.prompt!r}")
    if args.out:
        from PIL import Image

        image = logits.detach().sigmoid()[0].permute(1, 2, 0).mul(255).round().to(torch.uint8).numpy()
        Image.fromarray(image).save(args.out)
        print(f"wrote {args.out}")
    return losses


if __name__ == "__main__":
    main()
