"""Typed training run configs: dataclasses loaded from YAML, overridden by `--section.key value`, validated."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECTIONS = ("model", "data", "optim", "loss", "run")


@dataclass
class ModelConfig:
    """Which CLIP to train.

    Attributes:
        name: a preset name (`clipworks.list_models()`), `local-dir:DIR`, or "tiny": a small ViT CLIP described
            by the fields below (the default run's model).
        pretrained: weights for a preset (tag, file or directory); None trains from scratch.
        lock_image: freeze the image tower (LiT-style fine-tuning of the text tower).
        lock_image_unlocked_groups: with `lock_image`, this many layer groups from the top stay trainable
            (OpenCLIP's --lock-image-unlocked-groups: a ViT's groups are the embeddings, each block, the last block
            with the final norm, the projection; other image towers lock whole). Needs `lock_image`.
        lock_image_freeze_bn_stats: with `lock_image`, BatchNorm layers (ResNet towers) stop updating their
            running statistics too (OpenCLIP's --lock-image-freeze-bn-stats). Needs `lock_image`.
        lock_text: freeze the text tower.
        lock_text_unlocked_layers: with `lock_text`, this many groups from the top stay trainable (OpenCLIP's
            --lock-text-unlocked-layers: the embeddings, each block, the last block with the final norm, the
            projection). Needs `lock_text`.
        lock_text_freeze_layer_norm: with `lock_text`, layer norms lock with the rest (OpenCLIP's
            --lock-text-freeze-layer-norm); false is not supported, as in OpenCLIP.
        patch_dropout: fraction of a ViT's patch tokens dropped at random in each training forward pass (FLIP,
            Li et al. 2023; OpenCLIP's --force-patch-dropout): max(1, int(N * (1 - fraction))) of the N patches
            are kept, a random set per image; the class token is kept; evaluation sees every patch. 0 disables;
            other image towers take only 0.
        grad_checkpointing: recompute activations in the backward pass to save memory.
        embed_dim: "tiny" only: size of the shared embedding space.
        image_size: "tiny" only: input side in pixels.
        patch_size: "tiny" only: ViT patch side.
        vision_width: "tiny" only: image tower hidden size.
        vision_layers: "tiny" only: image tower blocks.
        vision_heads: "tiny" only: image tower attention heads.
        text_width: "tiny" only: text tower hidden size.
        text_layers: "tiny" only: text tower blocks.
        text_heads: "tiny" only: text tower attention heads.
        context_length: "tiny" only: text positions; captions are tokenized to this length.
    """

    name: str = "tiny"
    pretrained: str | None = None
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_text_freeze_layer_norm: bool = True
    patch_dropout: float = 0.0
    grad_checkpointing: bool = False
    embed_dim: int = 128
    image_size: int = 64
    patch_size: int = 16
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    context_length: int = 20


@dataclass
class DataConfig:
    """Where the image-caption pairs come from.

    Attributes:
        train: a data source string (`synthetic:shapes?...`, `csv:PATH`, `folder:DIR`, `wds:PATTERN`). A `wds:`
            pattern expands braces (`shards/{000..099}.tar`) and may name local files or streamed ones
            (`s3://`, `gs://`, `https://`, `hf://` through fsspec, extras `clipworks[s3]`, `[gcs]`, `[http]`,
            `[hub]`; `pipe:COMMAND` reads a command's output); several sources are joined with `::`
            (`wds:a/{000..099}.tar::s3://b/{000..009}.tar`). Missing local shards are reported before training;
            streamed ones are not looked up front (they fail when read, and are skipped and counted).
        batch_size: images per step on each process (the contrastive batch is batch_size x world size).
        workers: DataLoader worker processes (0 loads in the main process).
        eval_size: held-out synthetic scenes for zero-shot accuracy and retrieval recall, evaluated when the training
            data is synthetic or `run.synthetic_eval` is true (0 disables).
        upsampling_factors: with several `::`-joined `wds:` sources, how often each is sampled relative to the
            others, `::`-joined (`1::2`: the second source twice as often per shard as its size alone gives;
            OpenCLIP's --train-data-upsampling-factors): source i is drawn with probability factor_i x shards_i
            / sum_j factor_j x shards_j; needs `resampled`.
        resampled: draw shards with replacement, forever (OpenCLIP's --dataset-resampled), from a generator seeded
            by (run.seed, epoch, rank, worker); an epoch is then `train_num_samples` samples, and a resumed run
            reads on exactly as the interrupted one would have (same data.workers, same shards readable).
        train_num_samples: samples in one epoch of a `wds:` source (OpenCLIP's --train-num-samples), rounded up to
            whole batches on every process and worker; not resampled, a worker passes over its shards again (in a
            new order) until it has its share. None: one pass over the shards.
        shard_retries: retries in a row to open or read a streamed shard after a transient error (connection
            reset, timeout, HTTP 5xx; backoff doubling from 1 s) before it is skipped and counted; a retry after a
            mid-shard failure reads the shard again from its start, past the samples already used, so none is
            used twice. A missing or forbidden streamed shard is skipped without retries.
        max_failed_shards: the run stops, naming them, once more shards than this were skipped (counted per
            process, across its data workers).
        augment: random resized crops for training images, as the `aug_*` keys say; false uses the deterministic
            evaluation transform (and ignores them).
        aug_scale: the random crop's area as a fraction of the image's, a range (OpenCLIP's AugmentationCfg
            scale).
        aug_ratio: the random crop's aspect ratio (width / height) range, sampled log-uniformly.
        aug_interpolation: "bicubic", "bilinear" or "nearest", resizing the crop.
        aug_hflip: probability of a horizontal flip.
        aug_color_jitter: strength s of brightness, contrast and saturation jitter, each factor drawn from
            [1 - s, 1 + s]; 0 disables it.
        val_size: training samples held out of training for a validation loss and image-text recall every
            `run.eval_every` steps (0: none). The same ones in every run: the last N of a csv, tsv, folder or
            synthetic source; of a `wds:` pattern the first N of its last shard, which training then skips whole.
    """

    train: str = "synthetic:shapes?size=200000&seed=0&image_size=64"
    upsampling_factors: str | None = None
    resampled: bool = False
    train_num_samples: int | None = None
    shard_retries: int = 3
    max_failed_shards: int = 10
    batch_size: int = 128
    workers: int = 1
    eval_size: int = 500
    augment: bool = True
    aug_scale: tuple[float, float] = (0.9, 1.0)
    aug_ratio: tuple[float, float] = (0.75, 4 / 3)
    aug_interpolation: str = "bicubic"
    aug_hflip: float = 0.0
    aug_color_jitter: float = 0.0
    val_size: int = 0


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule.

    Attributes:
        lr: peak learning rate, reached at the end of warmup.
        weight_decay: decoupled weight decay for weight matrices (never gains, biases, embeddings, temperature).
        betas: AdamW's moment decay rates.
        eps: AdamW's denominator epsilon.
        warmup_steps: linear warmup length from 0 to `lr`.
        schedule: "cosine" decays to 0 at the last step; "constant" holds `lr` after warmup.
        grad_clip: clip the gradients' global norm to this value; 0 disables.
        accum_steps: split each batch into this many micro-batches to save memory while keeping the contrastive
            batch whole (GradCache): features of the whole batch are computed without gradients, the loss over
            the whole batch gives each feature's gradient, then each micro-batch runs again with gradients. The
            update equals the one-pass update; it costs one extra forward pass. `data.batch_size` stays the
            contrastive batch and must be divisible by it.
    """

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"
    grad_clip: float = 1.0
    accum_steps: int = 1


@dataclass
class LossConfig:
    """The contrastive loss.

    Attributes:
        kind: "clip" (softmax, symmetric cross-entropy) or "siglip" (pairwise sigmoid). SigLIP on a model without
            a logit bias adds one, as OpenCLIP's --siglip does: from scratch it starts as SigLIP does (bias -10,
            logit scale ln 10); pretrained weights keep their logit scale and start the bias at 0 (their logits
            unchanged).
        distill_model: a teacher model with weights (`NAME:TAG`, `local-dir:DIR`, ...) whose image-text logits the
            student also learns to match (OpenCLIP's --distill-model/--distill-pretrained, its DistillClipLoss: the
            contrastive loss plus the cross-entropy between the teacher's and the student's softmax); None: no
            distillation. Needs kind "clip" and chunk_size None; the teacher must take the student's images (image
            size, mean and std) and tokens (tokenizer). The metrics add both parts (contrastive_loss,
            distill_loss).
        local_loss: with several processes, compute only this process's rows of the logits.
        gather_with_grad: gather other processes' features with gradients (exact global-batch gradients).
        chunk_size: compute the logits in blocks of this many rows to save memory; None computes them at once.
    """

    kind: str = "clip"
    distill_model: str | None = None
    local_loss: bool = False
    gather_with_grad: bool = True
    chunk_size: int | None = None


@dataclass
class RunConfig:
    """How long to train, where outputs go, and what to watch.

    Attributes:
        steps: optimiser steps in total (a resumed run continues up to this count).
        seed: seeds model initialisation, data order and augmentation.
        precision: "fp32", "bf16" autocast, or "auto": bf16 autocast where the device computes bf16 natively (a
            CUDA GPU with bf16; a CPU with AVX-512 BF16, AMX or Arm BF16), fp32 elsewhere. The default is fp32:
            on a CPU with AMX bf16 trained ViT-B-32 1.7x faster but the default tiny model 0.75x as fast.
        compile: run the training steps' model through `torch.compile` (Inductor; on CPU it needs a C++ compiler,
            which it finds as g++ or clang++). It is compiled around the DDP wrapper, as PyTorch recommends;
            checkpoints, evaluation and the final model use the plain module, so their keys carry no `_orig_mod.`
            prefix and load with compile on or off. It does not pay on a 2-core CPU: the default tiny run made
            4.46 steps/s compiled and 4.39 without (steps 11-60, 3 interleaved runs each: 4.15-4.64 and 4.21-4.61),
            after a first step of 42 s (Inductor's cache cold; 3-4 s warm) and a recompile of 15 s at step 2 (the
            text tower trims padding, so the sequence length varies). Not measured on GPUs.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        out_dir: the run directory; None makes `runs/<timestamp>`.
        log_every: steps between metric rows in `metrics.csv`.
        eval_every: steps between evaluations (0: only at the end).
        eval_data: a labelled image set for zero-shot top-1 and top-5 accuracy every `run.eval_every` steps
            (`folder:DIR` of class folders, `csv:FILE`, `imagenet:DIR`, `cifar10:DIR`: any set `clipworks eval`
            classifies); None: none. The prompts are its class names in its own templates, else in OpenAI's ImageNet
            templates (fewer for many classes).
        eval_max_images: images of `run.eval_data` evaluated, at most (a fixed random subset of a larger set).
        synthetic_eval: also evaluate on `data.eval_size` synthetic held-out scenes when the training data is not
            synthetic (on synthetic data they are always evaluated).
        save_every: steps between run-state checkpoints (0: only at the end).
        keep_checkpoints: keep only the newest N complete checkpoints (milestones among them count), removing older
            ones each time a newer one is complete (0 keeps all). Only the main process removes; a removal renames
            the checkpoint away first, so one killed half-way is never resumed from. Directories holding files
            other than a checkpoint's are never removed.
        keep_every: also keep, whatever `keep_checkpoints` says, the checkpoints of steps that are multiples of this
            (milestones; 0: none).
        resume: "latest" (the newest intact checkpoint in `out_dir`, if any: one whose files fail their checksums is
            passed over with a warning), a checkpoint path, or None. At the start of a run, temporary directories
            of saves that were killed are removed.
        nonfinite: on a NaN/inf loss, "stop" the run naming the step, or "skip" the step's update.
        progress: show a progress bar.
        tensorboard: also write the metrics as TensorBoard scalars to `<run>/tensorboard` (needs `tensorboard`).
        wandb: also log the metrics and the config to Weights & Biases (needs `pip install 'clipworks[wandb]'`,
            checked before anything is built; its own settings, such as WANDB_MODE=offline, apply). The W&B run is
            named after the run directory and writes under `<run>/wandb`; its id is kept in `<run>/wandb_run_id`, so
            a resumed run continues the same W&B run.
        wandb_project: the Weights & Biases project.
        parallel: with several processes, "ddp" (a full model copy per process) or "fsdp" (parameters, gradients
            and optimiser state sharded across processes, for models that do not fit one device).
    """

    steps: int = 2000
    seed: int = 0
    precision: str = "fp32"
    compile: bool = False
    device: str = "auto"
    out_dir: str | None = None
    log_every: int = 10
    eval_every: int = 250
    eval_data: str | None = None
    eval_max_images: int = 1000
    synthetic_eval: bool = False
    save_every: int = 250
    keep_checkpoints: int = 0
    keep_every: int = 0
    resume: str | None = None
    nonfinite: str = "stop"
    progress: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "clipworks"
    parallel: str = "ddp"


@dataclass
class TrainConfig:
    """A whole training run: one config per section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists) for YAML."""
        return {s: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(getattr(self, s)).items()}
                for s in SECTIONS}  # fmt: skip

    def validate(self) -> TrainConfig:
        """Check the choice-valued fields; returns self. Raises ValueError naming the valid choices."""
        checks = [("loss.kind", self.loss.kind, ("clip", "siglip")),
                  ("optim.schedule", self.optim.schedule, ("cosine", "constant")),
                  ("run.precision", self.run.precision, ("fp32", "bf16", "auto")),
                  ("data.aug_interpolation", self.data.aug_interpolation, ("bicubic", "bilinear", "nearest")),
                  ("run.device", self.run.device, ("auto", "cpu", "cuda")),
                  ("run.nonfinite", self.run.nonfinite, ("stop", "skip")),
                  ("run.parallel", self.run.parallel, ("ddp", "fsdp"))]  # fmt: skip
        for name, value, choices in checks:
            if value not in choices:
                raise ValueError(f"{name}={value!r}: expected one of {list(choices)}")
        if min(self.run.steps, self.run.log_every, self.data.batch_size) < 1:
            raise ValueError("run.steps, run.log_every and data.batch_size must be at least 1")
        if not 1 <= self.optim.accum_steps <= self.data.batch_size or self.data.batch_size % self.optim.accum_steps:
            raise ValueError(f"optim.accum_steps={self.optim.accum_steps}: expected a divisor of data.batch_size="
                             f"{self.data.batch_size} (the micro-batch count; the contrastive batch stays whole)")
        if min(self.run.eval_every, self.run.save_every, self.data.workers, self.data.eval_size,
               self.data.val_size) < 0:  # fmt: skip
            raise ValueError("run.eval_every, run.save_every, data.workers, data.eval_size and data.val_size must not "
                             "be negative")  # fmt: skip
        if self.run.eval_max_images < 1:
            raise ValueError(f"run.eval_max_images={self.run.eval_max_images}: expected at least 1")
        if not 0 <= self.model.patch_dropout < 1:
            raise ValueError(f"model.patch_dropout={self.model.patch_dropout}: expected 0 <= fraction < 1")
        self._validate_finetuning()
        if min(self.run.keep_checkpoints, self.run.keep_every, self.data.shard_retries, self.data.max_failed_shards,
               self.model.lock_image_unlocked_groups, self.model.lock_text_unlocked_layers) < 0:  # fmt: skip
            raise ValueError("run.keep_checkpoints, run.keep_every, data.shard_retries, data.max_failed_shards and "
                             "the model's lock_* counts must not be negative")  # fmt: skip
        _check_stream(self.data)
        augment_config(self.data)
        return self

    def _validate_finetuning(self) -> None:
        """The lock and distillation keys that need another key set."""
        m, loss = self.model, self.loss
        if not m.lock_image and (m.lock_image_unlocked_groups or m.lock_image_freeze_bn_stats):
            raise ValueError("model.lock_image_unlocked_groups and model.lock_image_freeze_bn_stats need "
                             "model.lock_image true")  # fmt: skip
        if not m.lock_text and m.lock_text_unlocked_layers:
            raise ValueError("model.lock_text_unlocked_layers needs model.lock_text true")
        if m.lock_text and not m.lock_text_freeze_layer_norm:
            raise ValueError("model.lock_text_freeze_layer_norm=false is not supported (layer norms lock with the "
                             "rest, as in OpenCLIP): expected true")  # fmt: skip
        if loss.distill_model is not None and (loss.kind != "clip" or loss.chunk_size is not None):
            raise ValueError(f"loss.distill_model needs loss.kind clip and loss.chunk_size none, got "
                             f"{loss.kind!r} and {loss.chunk_size}")  # fmt: skip


def augment_config(data: DataConfig):
    """The `clipworks.transforms.AugmentConfig` of the `data.aug_*` keys (the training transform's augmentation).

    Raises:
        ValueError: a value out of range, naming its key and the range.
    """
    from ..transforms import AugmentConfig

    try:
        return AugmentConfig(scale=data.aug_scale, ratio=data.aug_ratio, interpolation=data.aug_interpolation,
                             hflip=data.aug_hflip, color_jitter=data.aug_color_jitter)  # fmt: skip
    except ValueError as e:  # AugmentConfig names the field ("scale=(0.0, 1.0): expected ...")
        raise ValueError(f"data.aug_{e}") from e


def _check_stream(d: DataConfig) -> None:
    """The `wds:` stream keys fit together (the count of upsampling factors is checked with the shards)."""
    if d.train_num_samples is not None and d.train_num_samples < 1:
        raise ValueError(f"data.train_num_samples={d.train_num_samples}: expected at least 1, or null (one pass)")
    if d.resampled and d.train_num_samples is None:
        raise ValueError("data.resampled draws shards for ever: set data.train_num_samples (samples per epoch)")
    if d.upsampling_factors is not None and not d.resampled:
        raise ValueError("data.upsampling_factors weigh draws with replacement: set data.resampled true")
    if (d.resampled or d.train_num_samples or d.upsampling_factors) and not d.train.startswith("wds:"):
        raise ValueError(f"data.resampled, data.train_num_samples and data.upsampling_factors apply to wds: sources, "
                         f"not {d.train.partition(':')[0]}:")  # fmt: skip


class ConfigKey(typing.NamedTuple):
    """One key of the run config, for `clipworks train --help`."""

    name: str  # section.key
    default: str  # as typed on the command line
    help: str  # the first sentence of the field's entry in its section's docstring


def _field_docs(cls: type) -> dict[str, str]:
    """The `Attributes:` entries of a config dataclass's docstring, by field name, each joined into one line."""
    docs: dict[str, str] = {}
    lines = inspect.cleandoc(cls.__doc__ or "").split("Attributes:", 1)[-1].splitlines()
    for line in lines[1:]:
        entry = re.match(r"    (\w+): (.*)", line)
        if entry:
            docs[entry[1]] = entry[2].strip()
        elif line.startswith("        ") and docs:  # a continuation of the last entry
            docs[next(reversed(docs))] += " " + line.strip()
    return docs


def _typed(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def config_keys() -> list[ConfigKey]:
    """Every key of the run config with its default and a one-line help, from the section dataclasses' fields and
    docstrings (so the command line's help cannot drift from the config)."""
    defaults, keys = TrainConfig(), []
    for name in SECTIONS:
        section = getattr(defaults, name)
        docs = _field_docs(type(section))
        for f in dataclasses.fields(section):
            first = re.split(r"(?<=\.)\s", docs.get(f.name, ""), maxsplit=1)[0].rstrip(".")
            keys.append(ConfigKey(f"{name}.{f.name}", _typed(getattr(section, f.name)), first))
    return keys


def _section(cfg: TrainConfig, name: str):
    if name not in SECTIONS:
        raise ValueError(f"unknown config section {name!r}; valid sections are {list(SECTIONS)}")
    return getattr(cfg, name)


def _field_type(section, key: str, where: str):
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise ValueError(f"unknown config key {where!r}; valid keys of [{where.split('.')[0]}] are {sorted(hints)}")
    return hints[key]


def _parse_scalar(tp, text: str, where: str):
    if tp is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{where}={text!r}: expected true or false")
    try:
        return tp(text)
    except ValueError as e:
        raise ValueError(f"{where}={text!r}: expected a {tp.__name__}") from e


def coerce(tp, value: Any, where: str) -> Any:
    """`value` (a command-line string or a YAML value) as type `tp`; raises ValueError naming `where`."""
    args = typing.get_args(tp)
    if type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        tp = next(a for a in args if a is not type(None))
        args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        if len(items) != len(args):
            raise ValueError(f"{where}={value!r}: expected {len(args)} comma-separated values")
        return tuple(coerce(a, v, where) for a, v in zip(args, items))
    if isinstance(value, str):
        return value if tp is str else _parse_scalar(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ValueError(f"{where}={value!r}: expected a {tp.__name__}")
    return value


def _set(cfg: TrainConfig, dotted: str, value: Any) -> None:
    if "." not in dotted:
        raise ValueError(f"config key {dotted!r} must be section.key, with section one of {list(SECTIONS)}")
    sec_name, key = dotted.split(".", 1)
    section = _section(cfg, sec_name)
    setattr(section, key, coerce(_field_type(section, key, dotted), value, dotted))


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`["--run.steps", "10", "--loss.kind=siglip"]` as `[("run.steps", "10"), ("loss.kind", "siglip")]`."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; overrides look like --section.key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args):
            key, value = arg[2:], args[i + 1]
            i += 2
        else:
            raise ValueError(f"override {arg!r} has no value")
        out.append((key, value))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The run config: defaults, then the YAML file at `path`, then `--section.key value` overrides.

    Raises:
        ValueError: an unknown section or key (named, with the valid keys), a value of the wrong type, or a file
            that is not YAML (naming file:line:column).
        OSError: the file cannot be read.
    """
    import yaml

    cfg = TrainConfig()
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:  # one line: file:line:col and the problem (yaml's own message spans five)
            mark, context, opened = (getattr(e, a, None) for a in ("problem_mark", "context", "context_mark"))
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            problem = getattr(e, "problem", None) or str(e)
            if context:
                problem += f" ({context}" + (f" from line {opened.line + 1}" if opened is not None else "") + ")"
            raise ValueError(f"{where}: YAML syntax error: {' '.join(problem.split())}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of sections {list(SECTIONS)}")
        for sec_name, values in data.items():
            if not isinstance(values, dict):
                _section(cfg, sec_name)
                raise ValueError(f"{path}: section {sec_name!r} must be a mapping of keys to values")
            for key, value in values.items():
                _set(cfg, f"{sec_name}.{key}", value)
    for key, value in parse_overrides(overrides or []):
        _set(cfg, key, value)
    return cfg.validate()


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back with `load_config`)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
