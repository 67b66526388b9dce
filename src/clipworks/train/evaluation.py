"""Evaluation during training: zero-shot accuracy on a labelled set (`run.eval_data`), validation loss and retrieval
recall on a slice of the training data held out from training (`data.val_size`), and the synthetic held-out scenes.

Each evaluation runs the current model on the same images (decoded once, and kept while they fit in
`EVAL_CACHE_BYTES`) and draws no random numbers, so a resumed run trains exactly as an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TrainConfig
from .zeroshot import EvalResult, SyntheticEval, encode_images, retrieval_recall

# An evaluation set's preprocessed images stay in memory when they take at most this many bytes, else they are
# decoded again at each evaluation (1,000 images of 224 x 224 pixels take 0.6 GB as float32).
EVAL_CACHE_BYTES = 1 << 30
# Zero-shot prompts (classes x templates) run through the text tower at each evaluation, at most: a set's own
# templates are cut to fit; OpenAI's 80 ImageNet templates give way to its 7 best, then to "a photo of a {}.".
MAX_PROMPTS = 8192
SUBSET_SEED = 0  # which images of a `run.eval_data` set larger than `run.eval_max_images` are kept: every run the same
SYNTHETIC_FIELDS = ("zero_shot_top1", "zero_shot_seen_top1")
DATA_FIELDS = ("eval_top1", "eval_top5")
RECALL_KEYS = ("image_to_text@1", "image_to_text@5", "text_to_image@1", "text_to_image@5")
VAL_FIELDS = ("val_loss", *(f"val_{k}" for k in RECALL_KEYS))

Sample = tuple[Tensor, object] | None  # (preprocessed image (3, S, S), its label or caption); None: unreadable


class EvalImages:
    """Preprocessed evaluation images with a payload each (a label, a caption): read once here, and kept as one
    tensor when they fit in `max_bytes`; otherwise each pass of `batches` reads them again.

    Args:
        read: yields the samples, the same ones in the same order at every call; None for an unreadable image
            (left out, and counted in `skipped`).
    """

    def __init__(self, read: Callable[[], Iterator[Sample]], max_bytes: int = EVAL_CACHE_BYTES):
        self.read, self.payloads, self.skipped = read, [], 0
        kept: list[Tensor] = []
        size = 0
        for sample in read():
            if sample is None:
                self.skipped += 1
                continue
            image, payload = sample
            self.payloads.append(payload)
            size += image.numel() * image.element_size()
            if size <= max_bytes:
                kept.append(image)
        self.images = torch.stack(kept) if kept and size <= max_bytes else None  # (N, 3, S, S); None: streamed

    def __len__(self) -> int:
        return len(self.payloads)

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, list]]:
        """(images (B, 3, S, S), their payloads), in order; B is `batch_size` but in the last batch."""
        if self.images is not None:
            for i in range(0, len(self), batch_size):
                yield self.images[i : i + batch_size], self.payloads[i : i + batch_size]
            return
        good = (s for s in self.read() if s is not None)
        while batch := list(itertools.islice(good, batch_size)):
            yield torch.stack([image for image, _ in batch]), [payload for _, payload in batch]


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


# --- zero-shot on run.eval_data -----------------------------------------------------------------------------------


def bounded_templates(num_classes: int, own: Sequence[str] | None, max_prompts: int = MAX_PROMPTS) -> list[str]:
    """The prompt templates for a set of `num_classes` classes: its `own` (the first ones, as many as fit), else
    the largest of OpenAI's ImageNet sets (80 templates, its 7 best, "a photo of a {}.") that fits in `max_prompts`
    prompts."""
    from ..eval.prompts import load_templates

    fit = max(1, max_prompts // max(num_classes, 1))
    if own:
        return list(own[:fit])
    for name in ("imagenet", "simple"):
        templates = load_templates(name)
        if len(templates) <= fit:
            return templates
    return load_templates("photo")


@dataclass
class ZeroShotResult:
    """Zero-shot accuracy on `run.eval_data`; `top5` is None with fewer than 5 classes."""

    name: str
    top1: float
    top5: float | None
    chance: float
    images: int

    def format(self) -> str:
        top5 = "" if self.top5 is None else f", top-5 {self.top5:.1%}"
        return (f"zero-shot on {self.name}: top-1 {self.top1:.1%} (chance {self.chance:.1%}, "
                f"{self.top1 / self.chance:.1f}x){top5} on {self.images} images")  # fmt: skip


class DataZeroShot:
    """Zero-shot classification of a labelled set (`folder:`, `csv:`, `imagenet:`, ... as `clipworks eval` reads
    them) with its class names and prompt templates (see `bounded_templates`); a set of more than `max_images`
    images is evaluated on a fixed random subset of them."""

    def __init__(self, spec: str, transform, tokenizer, max_images: int):
        from ..data.decode import ImageDecodeError
        from ..eval.sources import load_classification

        try:
            task = load_classification(spec)
        except (ValueError, OSError) as e:  # the same message, saying which key named the set
            raise type(e)(f"run.eval_data: {e}") from e
        n = len(task.labels)
        keep = range(n)
        if n > max_images:
            keep = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(SUBSET_SEED))[:max_images].tolist())

        def read() -> Iterator[Sample]:
            for i in keep:
                try:
                    yield task.images.preprocess(i, transform), task.labels[i]
                except (ImageDecodeError, OSError):
                    yield None

        self.images = EvalImages(read)
        if not len(self.images):
            raise ValueError(f"run.eval_data {spec}: none of its {len(keep)} images could be read")
        self.name, self.total, self.tokenizer = spec, n, tokenizer
        self.class_names = task.class_names
        self.templates = bounded_templates(len(task.class_names), task.templates)
        self.labels = torch.tensor(self.images.payloads)

    def describe(self) -> str:
        n, skipped = len(self.images), self.images.skipped
        of = f" of {self.total:,}" if self.total > n + skipped else ""
        unreadable = f", {skipped} unreadable left out" if skipped else ""
        return (f"zero-shot on {self.name} ({n:,}{of} images{unreadable}, {len(self.class_names)} classes x "
                f"{len(self.templates)} templates)")  # fmt: skip

    def evaluate(self, model: nn.Module, device: torch.device | str, batch_size: int) -> ZeroShotResult:
        from ..eval.metrics import classification_metrics
        from ..eval.prompts import zero_shot_weights

        with _eval_mode(model):
            classifier = zero_shot_weights(model, self.tokenizer, self.class_names, self.templates, device)  # (C, E)
            features = torch.cat([encode_images(model, images, batch_size, device)
                                  for images, _ in self.images.batches(batch_size)])  # fmt: skip
        metrics = classification_metrics((features @ classifier.t()).cpu(), self.labels, (1, 5))
        return ZeroShotResult(self.name, metrics["top1"], metrics["top5"], 1 / len(self.class_names), len(self.images))


# --- validation on a held-out slice of the training data -------------------------------------------------------------


@dataclass
class HeldOut:
    """The slice of the training data that `hold_out` kept out of training.

    Attributes:
        spec: the training data string.
        size: samples asked for.
        shard: for `wds:`, the shard held out whole (validation reads its first `size` samples); None for the
            last `size` samples of a map-style source.
        train_samples: what training draws from (None for a stream).
    """

    spec: str
    size: int
    shard: str | None
    train_samples: int | None

    def describe(self, read: int) -> str:
        """The slice, for the plan; `read` is how many of its samples could be read."""
        unreadable = f" ({self.size - read} unreadable)" if self.shard is None and read < self.size else ""
        if self.shard is None:
            return f"the last {self.size:,} samples{unreadable}"
        return f"{read:,} readable of the first {self.size:,} samples of {self.shard} (a shard held out of training)"

    def read(self, transform) -> Callable[[], Iterator[Sample]]:
        """A function that yields the slice's (image, caption) samples through `transform`."""
        from ..data.datasets import WebDataset, build_dataset

        if self.shard is not None:
            stream = WebDataset([self.shard], transform, shuffle=False)
            return lambda: itertools.islice(iter(stream), self.size)
        with warnings.catch_warnings():  # what the training source warns about (uncaptioned images) it said already
            warnings.simplefilter("ignore")
            dataset = build_dataset(self.spec, transform, shuffle=False)
        return lambda: (dataset[i] for i in range(len(dataset) - self.size, len(dataset)))


def hold_out(loader, spec: str, size: int, global_batch: int) -> HeldOut:
    """Keep `size` samples of a `make_loader` loader's source out of training, the same ones on every rank and in
    every run (a resumed run too): the last `size` of a map-style source (csv, tsv, folder, synthetic), which its
    sampler then never draws; or of a `wds:` pattern the last shard in pattern order, which the stream then skips.

    Raises:
        ValueError: a slice that leaves less than one batch to train on, or a `wds:` pattern of a single shard.
    """
    from ..data.datasets import EpochSampler, WebDataset

    dataset = loader.dataset
    if isinstance(dataset, WebDataset):
        if len(dataset.shards) < 2:
            raise ValueError(f"data.val_size with {spec}: the last shard is held out for validation, so it needs at "
                             f"least 2 shards (found {len(dataset.shards)}); set data.val_size 0")  # fmt: skip
        dataset.shards, shard = dataset.shards[:-1], dataset.shards[-1]  # before the workers start, which copy them
        return HeldOut(spec, size, shard, None)
    sampler = loader.sampler
    assert isinstance(sampler, EpochSampler), type(sampler)
    left = sampler.size - size
    if left < global_batch:
        raise ValueError(f"data.val_size={size} leaves {max(left, 0)} of the {sampler.size} samples of {spec} for "
                         f"training, less than one batch of {global_batch}")  # fmt: skip
    sampler.size = left  # the permutation of each epoch draws from the first `left` indices only
    return HeldOut(spec, size, None, left)


def contrastive_loss(kind: str, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                     logit_bias: Tensor | None = None) -> Tensor:  # fmt: skip
    """The training loss (`ClipLoss`, `SigLipLoss`) of one batch on one process: evaluation gathers nothing.

    Args:
        kind: "clip" or "siglip".
        image_features: normalised (B, E).
        text_features: normalised (B, E), row i the caption of image i.
    """
    logits = logit_scale * image_features @ text_features.t()  # (B, B)
    if logit_bias is not None:
        logits = logits + logit_bias
    if kind == "siglip":
        signs = 2 * torch.eye(len(logits), device=logits.device, dtype=logits.dtype) - 1
        return -F.logsigmoid(signs * logits).sum() / len(logits)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


@dataclass
class ValidationResult:
    """Loss and image-text retrieval recall on the held-out training samples."""

    loss: float
    recall: dict[str, float]
    samples: int

    def format(self) -> str:
        recall = ", ".join(f"{k} {self.recall[k]:.1%}" for k in RECALL_KEYS)
        return f"validation on {self.samples:,} held-out samples: loss {self.loss:.4f}; recall {recall}"


class Validation:
    """The contrastive loss, in batches of the training's contrastive batch (one batch when there are fewer
    samples; a last partial batch left out of the loss), and retrieval recall among all the held-out samples, where
    an equal caption counts as a right answer."""

    def __init__(self, samples: EvalImages, tokenizer, loss_kind: str, loss_batch: int):
        if not len(samples):
            raise ValueError("data.val_size: none of the held-out samples could be read")
        self.samples, self.tokenizer, self.loss_kind, self.loss_batch = samples, tokenizer, loss_kind, loss_batch
        ids = {c: i for i, c in enumerate(dict.fromkeys(samples.payloads))}
        cid = torch.tensor([ids[c] for c in samples.payloads])
        self.positives = cid[:, None] == cid[None, :]  # (N, N)

    def evaluate(self, model: nn.Module, device: torch.device | str, batch_size: int) -> ValidationResult:
        image_f, text_f = [], []
        with _eval_mode(model):
            for images, captions in self.samples.batches(batch_size):
                out = model(images.to(device), self.tokenizer(captions).to(device))
                image_f.append(out.image_features.float())
                text_f.append(out.text_features.float())
            image, text = torch.cat(image_f), torch.cat(text_f)  # (N, E) each
            b = min(self.loss_batch, len(image))
            losses = [contrastive_loss(self.loss_kind, image[i : i + b], text[i : i + b], out.logit_scale.float(),
                                       out.logit_bias) for i in range(0, len(image) - b + 1, b)]  # fmt: skip
            loss = torch.stack(losses).mean().item()
        recall = retrieval_recall(image.cpu(), text.cpu(), self.positives)
        return ValidationResult(loss, {k: recall[k] for k in RECALL_KEYS}, len(image))


# --- what a run evaluates ---------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """One evaluation's results; None for what the run does not evaluate."""

    synthetic: EvalResult | None = None
    data: ZeroShotResult | None = None
    val: ValidationResult | None = None

    def columns(self) -> dict[str, float | None]:
        """The metrics.csv columns these results fill."""
        out: dict[str, float | None] = {}
        if self.synthetic is not None:
            out |= {"zero_shot_top1": self.synthetic.top1, "zero_shot_seen_top1": self.synthetic.seen_top1}
        if self.data is not None:
            out |= {"eval_top1": self.data.top1, "eval_top5": self.data.top5}
        if self.val is not None:
            out |= {"val_loss": self.val.loss} | {f"val_{k}": v for k, v in self.val.recall.items()}
        return out

    def lines(self) -> list[str]:
        return [r.format() for r in (self.synthetic, self.data, self.val) if r is not None]


class Evaluator:
    """What a run evaluates every `run.eval_every` steps: any of the synthetic held-out scenes, `run.eval_data` and
    the held-out slice of the training data."""

    def __init__(self, synthetic: SyntheticEval | None, data: DataZeroShot | None, val: Validation | None,
                 batch_size: int):  # fmt: skip
        self.synthetic, self.data, self.val, self.batch_size = synthetic, data, val, batch_size

    @classmethod
    def create(cls, cfg: TrainConfig, transform, tokenizer, held_out: HeldOut | None,
               world_size: int = 1) -> Evaluator | None:  # fmt: skip
        """The evaluations `cfg` asks for (None when none): the synthetic scenes on synthetic training data or with
        `run.synthetic_eval`, `run.eval_data` when set, validation when `held_out` is given."""
        from ..data.datasets import parse_data_spec

        synthetic_data = parse_data_spec(cfg.data.train).scheme == "synthetic"
        synthetic = None
        if cfg.data.eval_size > 0 and (synthetic_data or cfg.run.synthetic_eval):
            synthetic = SyntheticEval(cfg.data.eval_size, transform, tokenizer)
        data = None
        if cfg.run.eval_data:
            data = DataZeroShot(cfg.run.eval_data, transform, tokenizer, cfg.run.eval_max_images)
        val = None
        if held_out is not None:
            val = Validation(EvalImages(held_out.read(transform)), tokenizer, cfg.loss.kind,
                             cfg.data.batch_size * world_size)  # fmt: skip
        if synthetic is None and data is None and val is None:
            return None
        return cls(synthetic, data, val, cfg.data.batch_size)

    @property
    def fields(self) -> tuple[str, ...]:
        """The metrics.csv columns of these evaluations."""
        return ((SYNTHETIC_FIELDS if self.synthetic else ()) + (DATA_FIELDS if self.data else ())
                + (VAL_FIELDS if self.val else ()))  # fmt: skip

    def describe(self, cfg: TrainConfig, held_out: HeldOut | None) -> list[str]:
        """What is evaluated, for the plan at the start of the run."""
        out = []
        if self.synthetic is not None:
            out.append(f"{cfg.data.eval_size} held-out scenes for zero-shot evaluation")
        if self.data is not None:
            out.append(self.data.describe())
        if self.val is not None and held_out is not None:
            out.append(f"validation loss and recall on {held_out.describe(len(self.val.samples))}")
        return out

    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu") -> Evaluation:
        """Every evaluation of `model` (left in the mode it was in)."""
        return Evaluation(
            self.synthetic.evaluate(model, device) if self.synthetic else None,
            self.data.evaluate(model, device, self.batch_size) if self.data else None,
            self.val.evaluate(model, device, self.batch_size) if self.val else None,
        )
