"""The tasks a benchmark cell runs, as CLIP_benchmark names them and their metrics.

- zeroshot_classification: acc1, acc5, mean_per_class_recall (a multi-label set: mean_average_precision);
- zeroshot_retrieval: image_retrieval_recall@k and text_retrieval_recall@k, k = 1, 5, 10;
- linear_probe: CLIP_benchmark's protocol (AdamW, cosine schedule, weight decay searched on a validation split of
  the train split): lp_acc1, lp_acc5, lp_mean_per_class_recall, weight_decay, epochs, seed, fewshot_k;
- captioning: captions generated as CLIP_benchmark generates them (OpenCLIP's `generate` defaults: beam search,
  6 beams in 3 groups, 30 tokens), scored against every reference caption of the image: Bleu_1..4, ROUGE_L, CIDEr
  (`captioning.caption_metrics`; no METEOR or SPICE);
- image_caption_selection: image_acc, text_acc, acc, counted as CLIP_benchmark counts them (`selection_metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"
LINEAR_PROBE, CAPTIONING, SELECTION = "linear_probe", "captioning", "image_caption_selection"
TASKS = (CLASSIFICATION, RETRIEVAL, LINEAR_PROBE, CAPTIONING, SELECTION)
# The tasks a dataset can run, by its default task (CLIP_benchmark's get_dataset_default_task).
OTHER_TASKS = {CLASSIFICATION: (LINEAR_PROBE,), RETRIEVAL: (CAPTIONING,), SELECTION: ()}
# The one number of a cell that results.md shows and the plots draw, per task.
SCORE_NAMES = {CLASSIFICATION: "acc1", RETRIEVAL: "mean recall@5", LINEAR_PROBE: "lp_acc1", CAPTIONING: "CIDEr",
               SELECTION: "acc"}  # fmt: skip
SCORE_HELP = ("zero-shot classification: top-1 accuracy (acc1; a multi-label set: mean average precision); "
              "retrieval: the mean of image and text recall@5; linear probe: lp_acc1; captioning: CIDEr; "
              "caption selection: acc")  # fmt: skip
AVERAGED = (CLASSIFICATION, RETRIEVAL)  # the tasks in a model's average (fractions of one kind, as OpenCLIP's table)
# Ours -> CLIP_benchmark's metric names.
METRIC_NAMES = {"top1": "acc1", "top5": "acc5", "mean_per_class_recall": "mean_per_class_recall",
                "mean_average_precision": "mean_average_precision",
                **{f"text_to_image@{k}": f"image_retrieval_recall@{k}" for k in (1, 5, 10)},
                **{f"image_to_text@{k}": f"text_retrieval_recall@{k}" for k in (1, 5, 10)}}  # fmt: skip
CAPTION_BATCH = 8  # images captioned together (beam search holds 6 beams of each)


class NotApplicable(ValueError):
    """The cell's model cannot run its task (captioning needs a caption decoder): skipped, not failed."""


def main_score(record: dict) -> float | None:
    """The one number results.md shows for a cell (`SCORE_HELP`); None when the set was too small for it."""
    m, task = record["metrics"], record["task"]
    if task == RETRIEVAL:
        pair = (m.get("image_retrieval_recall@5"), m.get("text_retrieval_recall@5"))
        return None if None in pair else (pair[0] + pair[1]) / 2
    if task == CLASSIFICATION and "acc1" not in m:
        return m.get("mean_average_precision")
    return m.get(SCORE_NAMES.get(task, ""))


def train_spec(text: str) -> str:
    """The train split of a data spec (its `?split=` set to train), for the linear probe.

    Raises:
        ValueError: a spec without splits (a folder, a csv file).
    """
    from .sources import Spec, parse_spec

    spec = parse_spec(text)
    if "split" not in spec.options:
        raise ValueError(f"{text}: a linear probe needs a train split, and {spec.scheme}: has no ?split=; name the "
                         "training data as a dataset with splits (wds-benchmark:, imagenet:, cifar10:, ...)")  # fmt: skip
    return str(Spec(spec.scheme, spec.path, {**spec.options, "split": "train"}))


def load(spec: str, task: str):
    """What `evaluate` takes for a (dataset, task): the loaded set(s), read once per dataset and task."""
    from . import sources
    from .prompts import load_templates

    if task in (RETRIEVAL, CAPTIONING):
        return sources.load_captioned(spec)
    if task == SELECTION:
        scheme = sources.parse_spec(spec).scheme
        return sources.load_paired(spec) if scheme == "winoground" else sources.load_with_negatives(spec)
    if task == LINEAR_PROBE:
        return sources.load_classification(train_spec(spec)), sources.load_classification(spec)
    if is_multilabel(spec):
        data = sources.load_multilabel(spec)
        return data, data.templates or load_templates("imagenet")
    data = sources.load_classification(spec)
    return data, data.templates or load_templates("imagenet")


def is_multilabel(text: str) -> bool:
    """Whether a classification spec names a multi-label set (`voc2007-multilabel:`, or a wds-benchmark export whose
    dataset_type.txt says multilabel)."""
    from .datasets import wds_benchmark
    from .sources import parse_spec

    spec = parse_spec(text)
    return spec.scheme == "voc2007-multilabel" or (
        spec.scheme == "wds-benchmark" and wds_benchmark.dataset_type(spec) == "multilabel")


def evaluate(embedder, task: str, loaded) -> dict:
    """A cell's metrics under CLIP_benchmark's names."""
    from . import tasks
    from .sources import MultiLabel

    if task == RETRIEVAL:
        return _renamed(tasks.retrieval(embedder, loaded).metrics)
    if task == CLASSIFICATION:
        run = tasks.zeroshot_multilabel if isinstance(loaded[0], MultiLabel) else tasks.zeroshot
        return _renamed(run(embedder, *loaded).metrics)
    if task == LINEAR_PROBE:
        return _linear_probe(embedder, *loaded)
    if task == CAPTIONING:
        return _captioning(embedder, loaded)
    return _selection(embedder, loaded)


def _renamed(metrics: dict) -> dict:
    return {METRIC_NAMES[k]: v for k, v in metrics.items() if k in METRIC_NAMES}


def _linear_probe(embedder, train, test) -> dict:
    from .linear_probe import AdamWProtocol
    from .tasks import linear_probe_eval

    protocol = AdamWProtocol()
    m = linear_probe_eval(embedder, train, test, adamw=protocol).metrics
    return {"lp_acc1": m["top1"], "lp_acc5": m["top5"], "lp_mean_per_class_recall": m["mean_per_class_recall"],
            "weight_decay": m["weight_decay"], "epochs": protocol.epochs, "seed": protocol.seed,
            "fewshot_k": protocol.fewshot_k}  # fmt: skip


def generate_captions(embedder, images, batch_size: int = CAPTION_BATCH) -> tuple[list[int], list[str]]:
    """(indices of the readable images, a caption each) from the embedder's CoCa model, with OpenCLIP's `generate`
    defaults as CLIP_benchmark calls it.

    Raises:
        NotApplicable: the model has no caption decoder.
    """
    from ..caption_commands import captions_text

    model = embedder.model
    if getattr(model, "decoder", None) is None:
        raise NotApplicable("captioning needs a model with a caption decoder (CoCa)")
    kept, captions = [], []
    for start in range(0, len(images), batch_size):
        batch, tensors = [], []
        for i in range(start, min(start + batch_size, len(images))):
            try:
                tensors.append(images.preprocess(i, embedder.transform))
                batch.append(i)
            except (OSError, ValueError):  # an unreadable image is left out, as in every other task
                continue
        if tensors:
            with torch.inference_mode():
                ids = model.generate(torch.stack(tensors).to(embedder.device))
            kept += batch
            captions += captions_text(embedder.tokenizer, ids)
    return kept, captions


def _captioning(embedder, data) -> dict:
    from .captioning import caption_metrics

    references: list[list[str]] = [[] for _ in range(len(data.images))]
    for caption, image in zip(data.captions, data.caption_image):
        references[image].append(caption)
    kept, generated = generate_captions(embedder, data.images)
    kept_refs = [references[i] for i in kept]
    pairs = [(r, g) for r, g in zip(kept_refs, generated) if r]  # images without a reference caption are left out
    if not pairs:
        raise ValueError("captioning: no readable image with a reference caption")
    return caption_metrics([r for r, _ in pairs], [g for _, g in pairs])


def selection_metrics(scores: Sequence[Tensor]) -> dict[str, float]:
    """CLIP_benchmark's image_caption_selection: per example a (images, captions) score matrix whose first
    min(images, captions) entries pair up (image k with caption k). text correct: each of those images' best caption
    is its own; image correct: each of those captions' best image is its own; acc: both. Ties go to the lower index
    (argmax), as CLIP_benchmark's; one image against its caption and negatives (SugarCrepe) is always image-correct.
    """
    text = image = both = 0
    for s in scores:
        gt = torch.arange(min(s.shape))
        t = bool((s.argmax(dim=1)[: len(gt)] == gt).all())
        i = bool((s.argmax(dim=0)[: len(gt)] == gt).all())
        text, image, both = text + t, image + i, both + (t and i)
    n = len(scores)
    return {"image_acc": image / n, "text_acc": text / n, "acc": both / n}


def _selection(embedder, data) -> dict:
    from .sources import Paired

    feats = embedder.images(data.images)
    if isinstance(data, Paired):
        text = embedder.texts(data.captions)
        image_f, text_f = feats.features.view(-1, 2, feats.features.shape[-1]), text.view(-1, 2, text.shape[-1])
        keep = feats.valid.view(-1, 2).all(dim=1).tolist()
        scores = [image_f[n] @ text_f[n].t() for n in range(len(keep)) if keep[n]]  # (2 images, 2 captions)
    else:
        texts = list(dict.fromkeys([*data.captions, *(t for row in data.negatives for t in row if t)]))
        where = {t: k for k, t in enumerate(texts)}
        text_f = embedder.texts(texts)
        scores = [feats.features[n : n + 1] @ text_f[[where[c], *(where[t] for t in row if t)]].t()
                  for n, (c, row) in enumerate(zip(data.captions, data.negatives)) if feats.valid[n]]  # fmt: skip
    if not scores:
        raise ValueError("image-caption selection: no readable images")
    return selection_metrics(scores)
