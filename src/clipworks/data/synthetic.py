"""The built-in `synthetic:shapes` data: captioned scenes of coloured shapes with held-out combinations.

Each scene holds one coloured shape (most) or two with a spatial relation ("a red circle left of a blue
square"), on a jittered grey background with pixel noise, drawn with Pillow on a small canvas. Six colours x
six shapes give 36 (colour, shape) pairs; the six pairs of `HELDOUT_PAIRS` (one per colour and one per
shape, so every colour and every shape still appears in training with five partners) never occur in split
"train", in either object. Split "heldout" has only scenes whose main object (the first one) is a held-out
pair, so zero-shot accuracy and retrieval on it measure generalisation to unseen combinations; split "val"
draws seen pairs from a separate stream.

Sample `i` of a split is a pure function of `(config, split, i)`: each sample seeds its own generators from
a hash of `(seed, split, i)`, nothing touches a global RNG, so any DataLoader worker produces any index and
a resumed run sees the same data.

Speed (64x64, one core of the 2-core CPU machine, measured): about 6,000 images/s with captions (~170 us
each, mostly Pillow drawing and the noise); `scene(i)` alone (attributes and caption, no pixels) ~50,000/s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = [
    "COLORS",
    "HELDOUT_PAIRS",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "CompositionalPair",
    "CompositionalTask",
    "Scene",
    "ShapeObject",
    "ShapesConfig",
    "ShapesDataset",
    "ZeroShotTask",
    "compositional_task",
    "heldout_pairs",
    "make_scene",
    "render_scene",
    "zero_shot_task",
]

# Saturated colours far apart in RGB (the closest, red and orange, differ by 100 in G), so the per-object
# jitter of `ShapesConfig.color_jitter` never makes one look like another; all stand out from grey.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (40, 175, 60),
    "blue": (45, 80, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 55, 205),
    "orange": (250, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # the 2x2 grid, row-major
RELATIONS = ("left of", "right of", "above", "below")
SPLITS = ("train", "val", "heldout")

# One pair per colour and per shape (a permutation of the shapes): 6 of 36 pairs, 16.7%.
HELDOUT_PAIRS = (
    ("red", "star"),
    ("green", "circle"),
    ("blue", "triangle"),
    ("yellow", "hexagon"),
    ("purple", "square"),
    ("orange", "cross"),
)
_ALL_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES)
_SEEN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in HELDOUT_PAIRS)
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Object radius as a fraction of the image side; a large object (diameter ~0.45) fits inside a grid cell.
_RADIUS = {"small": 0.15, "large": 0.22}

_SINGLE_TEMPLATES = (
    "a {color} {shape}",
    "a {size} {color} {shape}",
    "a photo of a {color} {shape}.",
    "a photo of a {size} {color} {shape}.",
    "a {color} {shape} in the {position}",
    "a {size} {color} {shape} in the {position}.",
)
_PARTIAL_TEMPLATES = ("a {shape}", "a photo of a {shape}.", "a {color} shape", "something {color}")
_PAIR_TEMPLATES = (
    "a {color} {shape} {relation} a {color2} {shape2}",
    "a {size} {color} {shape} {relation} a {size2} {color2} {shape2}",
    "a photo of a {color} {shape} {relation} a {color2} {shape2}.",
    "a {color2} {shape2} {inverse} a {color} {shape}",
)


def heldout_pairs() -> list[tuple[str, str]]:
    """The (colour, shape) pairs that never appear in split "train"."""
    return list(HELDOUT_PAIRS)


@dataclass(frozen=True)
class ShapesConfig:
    """How scenes are drawn; two datasets with equal configs, split and index give identical samples.

    Attributes:
        image_size: side of the square RGB images in pixels; shapes scale with it.
        seed: base seed; different seeds give different scenes for the same index.
        two_object_fraction: share of scenes with two objects and a spatial relation.
        noise: amplitude of uniform per-pixel noise (0-255 scale).
        color_jitter: maximum per-channel offset of each object's colour from its named RGB.
        rotation_jitter: maximum rotation of the polygon shapes in degrees.
        partial_caption_fraction: share of single-object scenes captioned by their shape alone or their colour
            alone ("a star", "a red shape"), which pushes both towers to encode the two attributes apart.
            Split "train" only: evaluation splits always name both.
    """

    image_size: int = 64
    seed: int = 0
    two_object_fraction: float = 0.25
    noise: int = 12
    color_jitter: int = 20
    rotation_jitter: float = 15.0
    partial_caption_fraction: float = 0.0

    def __post_init__(self):
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {self.image_size}")
        for name in ("two_object_fraction", "partial_caption_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.noise <= 64 or not 0 <= self.color_jitter <= 40:
            raise ValueError(f"noise must lie in [0, 64] and color_jitter in [0, 40], got {self.noise}, "
                             f"{self.color_jitter}")


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape: its attributes and its centre in pixels."""

    color: str
    shape: str
    size: str
    position: str
    center: tuple[float, float]

    @property
    def name(self) -> str:
        """The class name of its (colour, shape) pair, e.g. "red circle"."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """What sample `i` shows and says. `objects[0]` is the main object; `relation` relates it to `objects[1]`.

    Attributes:
        objects: one or two objects.
        relation: for two objects, where the first lies relative to the second ("left of", ...); else None.
        caption: the caption the dataset returns with the image.
        background: the background's RGB before noise.
    """

    objects: tuple[ShapeObject, ...]
    relation: str | None
    caption: str
    background: tuple[int, int, int]


def _seed(config: ShapesConfig, split: str, index: int, stream: str) -> int:
    key = f"clipworks.shapes:{config.seed}:{split}:{index}:{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def _place(rng: random.Random, config: ShapesConfig, color: str, shape: str, cell: tuple[int, int],
           size: str) -> ShapeObject:
    """An object in grid cell (row, col), jittered as far as it can go without leaving the cell."""
    side = config.image_size
    radius = _RADIUS[size] * side
    slack = max(side / 4 - radius - 1, 0.0)
    row, col = cell
    cx = (col + 0.5) * side / 2 + rng.uniform(-slack, slack)
    cy = (row + 0.5) * side / 2 + rng.uniform(-slack, slack)
    return ShapeObject(color, shape, size, POSITIONS[2 * row + col], (cx, cy))


def _articles(text: str) -> str:
    """Fix "a" before a vowel ("a orange star" -> "an orange star")."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _describe(rng: random.Random, objects: tuple[ShapeObject, ...], relation: str | None, partial: float) -> str:
    a = objects[0]
    if relation is None:
        template = rng.choice(_PARTIAL_TEMPLATES if rng.random() < partial else _SINGLE_TEMPLATES)
        return _articles(template.format(color=a.color, shape=a.shape, size=a.size, position=a.position))
    b = objects[1]
    template = rng.choice(_PAIR_TEMPLATES)
    return _articles(template.format(color=a.color, shape=a.shape, size=a.size, color2=b.color, shape2=b.shape,
                                     size2=b.size, relation=relation, inverse=_INVERSE[relation]))


def make_scene(config: ShapesConfig, split: str, index: int) -> Scene:
    """Sample scene `index` of `split`: a pure function of its arguments."""
    rng = random.Random(_seed(config, split, index, "scene"))
    main_pairs = HELDOUT_PAIRS if split == "heldout" else _SEEN_PAIRS
    color, shape = rng.choice(main_pairs)
    grey = rng.randint(60, 170)
    background = tuple(min(max(grey + rng.randint(-15, 15), 0), 255) for _ in range(3))
    if rng.random() >= config.two_object_fraction:
        cell = (rng.randrange(2), rng.randrange(2))
        objects = (_place(rng, config, color, shape, cell, rng.choice(SIZES)),)
        relation = None
    else:
        # The partner differs in colour and in shape, so swapping either attribute changes the caption.
        # In "train" it is a seen pair too; in "heldout" it may be any pair.
        partners = _SEEN_PAIRS if split == "train" else _ALL_PAIRS
        color2, shape2 = rng.choice([p for p in partners if p[0] != color and p[1] != shape])
        relation = rng.choice(RELATIONS)
        first, other = rng.randrange(2), rng.randrange(2)  # the coordinate the relation leaves free
        if relation in ("left of", "right of"):
            lead = 0 if relation == "left of" else 1
            cells = ((first, lead), (other, 1 - lead))
        else:
            lead = 0 if relation == "above" else 1
            cells = ((lead, first), (1 - lead, other))
        objects = (_place(rng, config, color, shape, cells[0], rng.choice(SIZES)),
                   _place(rng, config, color2, shape2, cells[1], rng.choice(SIZES)))
    partial = config.partial_caption_fraction if split == "train" else 0.0  # evaluation captions stay whole
    caption = _describe(rng, objects, relation, partial)
    return Scene(objects, relation, caption, background)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygon shape of circumradius about `r`, rotated by `angle` radians."""
    if shape == "square":
        polar = [(r * 0.95, math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "triangle":
        polar = [(r * 1.1, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "hexagon":
        polar = [(r, k * math.pi / 3) for k in range(6)]
    elif shape == "star":
        polar = [(r * (1.15 if k % 2 == 0 else 0.45), -math.pi / 2 + k * math.pi / 5) for k in range(10)]
    else:  # cross: a plus sign with arms of half-width w
        w = 0.34 * r
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w),
               (-w, w), (-w, r)]
        polar = [(math.hypot(x, y), math.atan2(y, x)) for x, y in pts]
    return [(cx + d * math.cos(a + angle), cy + d * math.sin(a + angle)) for d, a in polar]


def render_scene(scene: Scene, config: ShapesConfig, seed: int) -> Image.Image:
    """Draw `scene` as an RGB image; `seed` drives the colour, rotation and pixel-noise jitter."""
    rng = np.random.default_rng(seed)
    side = config.image_size
    image = Image.new("RGB", (side, side), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        jitter = rng.integers(-config.color_jitter, config.color_jitter + 1, 3)
        fill = tuple(int(v) for v in np.clip(np.array(COLORS[obj.color]) + jitter, 0, 255))
        r = _RADIUS[obj.size] * side
        cx, cy = obj.center
        angle = math.radians(rng.uniform(-config.rotation_jitter, config.rotation_jitter))
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r, angle), fill=fill)
    if config.noise == 0:
        return image
    pixels = np.asarray(image, dtype=np.int16)  # (H, W, 3)
    pixels = pixels + rng.integers(-config.noise, config.noise + 1, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


class ShapesDataset(torch.utils.data.Dataset):
    """`size` captioned scenes of one split; item `i` is `(RGB image, caption)`, the same in every process.

    Args:
        split: "train" (seen pairs only), "val" (seen pairs, another stream) or "heldout" (main object a
            held-out pair).
        size: number of samples.
        config: drawing parameters and seed.
    """

    def __init__(self, split: str = "train", size: int = 10_000, config: ShapesConfig = ShapesConfig()):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if size < 0:
            raise ValueError(f"size must be non-negative, got {size}")
        self.split, self.size, self.config = split, size, config

    def __len__(self) -> int:
        return self.size

    def _check(self, index: int) -> int:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of {self.size}")
        return index % self.size

    def scene(self, index: int) -> Scene:
        """The attributes and caption of sample `index`, without drawing it."""
        return make_scene(self.config, self.split, self._check(index))

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        index = self._check(index)
        scene = make_scene(self.config, self.split, index)
        return render_scene(scene, self.config, _seed(self.config, self.split, index, "pixels")), scene.caption

    def __repr__(self) -> str:
        return f"ShapesDataset(split={self.split!r}, size={self.size}, config={self.config})"


@dataclass(frozen=True)
class ZeroShotTask:
    """Zero-shot classification of single-object scenes into all 36 (colour, shape) classes.

    Attributes:
        class_names: one per (colour, shape) pair, held-out ones included, e.g. "red circle".
        templates: prompts with one "{}" for the class name.
        dataset: the single-object scenes; image `i` is `dataset[i][0]`.
        samples: `(dataset index, label)` with label the index of the main object's pair in `class_names`.
    """

    class_names: list[str]
    templates: list[str]
    dataset: ShapesDataset
    samples: list[tuple[int, int]]

    @property
    def chance(self) -> float:
        """Accuracy of guessing uniformly among the classes."""
        return 1.0 / len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def item(self, k: int) -> tuple[Image.Image, int]:
        """Sample `k` as `(image, label)`."""
        index, label = self.samples[k]
        return self.dataset[index][0], label


def zero_shot_task(split: str = "heldout", size: int = 1000, config: ShapesConfig = ShapesConfig()) -> ZeroShotTask:
    """`size` single-object scenes of `split` labelled with their (colour, shape) class among all 36.

    The scenes come from `config` with `two_object_fraction=0`, so they differ from the training stream's.
    """
    dataset = ShapesDataset(split, size, dataclasses.replace(config, two_object_fraction=0.0))
    class_names = [f"{c} {s}" for c, s in _ALL_PAIRS]
    label = {name: k for k, name in enumerate(class_names)}
    samples = [(i, label[dataset.scene(i).objects[0].name]) for i in range(size)]
    return ZeroShotTask(class_names, ["a photo of a {}.", "a {}."], dataset, samples)


@dataclass(frozen=True)
class CompositionalPair:
    """An image with its true caption and a hard negative differing only by a swap.

    Attributes:
        index: the image's index in the task's dataset.
        caption: the true caption, e.g. "a red circle left of a blue square".
        negative: the same words with one swap, e.g. "a blue circle left of a red square".
        kind: what was swapped: "color" (colours between the objects) or "relation" (its inverse).
    """

    index: int
    caption: str
    negative: str
    kind: str


@dataclass(frozen=True)
class CompositionalTask:
    """Pick the true caption over its swapped twin; chance is 0.5.

    Attributes:
        dataset: two-object scenes; image of a pair is `dataset[pair.index][0]`.
        pairs: two per scene, one of each kind.
    """

    dataset: ShapesDataset
    pairs: list[CompositionalPair]

    @property
    def chance(self) -> float:
        """Accuracy of choosing between the two captions at random."""
        return 0.5


def compositional_task(split: str = "heldout", size: int = 500,
                       config: ShapesConfig = ShapesConfig()) -> CompositionalTask:
    """`size` two-object scenes of `split`, each with a colour-swap and a relation-swap hard negative."""
    dataset = ShapesDataset(split, size, dataclasses.replace(config, two_object_fraction=1.0))
    pairs = []
    for i in range(size):
        scene = dataset.scene(i)
        a, b = scene.objects
        rel = scene.relation
        caption = _articles(f"a {a.color} {a.shape} {rel} a {b.color} {b.shape}")
        swapped = _articles(f"a {b.color} {a.shape} {rel} a {a.color} {b.shape}")
        inverse = _articles(f"a {a.color} {a.shape} {_INVERSE[rel]} a {b.color} {b.shape}")
        pairs.append(CompositionalPair(i, caption, swapped, "color"))
        pairs.append(CompositionalPair(i, caption, inverse, "relation"))
    return CompositionalTask(dataset, pairs)
