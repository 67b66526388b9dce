"""The training loop: model, data, AdamW, contrastive loss, evaluation, checkpoints; one process or torchrun DDP."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import CLIPConfig, TextConfig, VisionTransformerConfig
from ..hardware import resolve_precision
from .config import ModelConfig, TrainConfig, augment_config, save_config
from .console import StopRequest, TimeEstimate, TrainingInterrupted, missing_dirs, plan_lines, remove_created
from .distributed import (
    Distributed,
    same_everywhere,
    everywhere,
    full_model_state,
    full_optimizer_state,
    load_full_state,
    setup_distributed,
    sync_replicated_grads,
    wrap_model,
)
from .optim import build_optimizer, build_scheduler, follow_config
from .state import (
    DataPosition,
    checkpoint_dir,
    latest_checkpoint,
    load_resume,
    remove_old_checkpoints,
    remove_stale_temporaries,
    save_checkpoint,
    set_rng_state,
)
from .evaluation import Evaluation, Evaluator, HeldOut, ValidationResult, ZeroShotResult, hold_out
from .metrics_log import METRIC_FIELDS, MetricsLog, import_wandb, start_wandb
from .zeroshot import EvalResult

# With loss.distill_model the loss is the sum of these two parts (`DistillLoss`), logged after METRIC_FIELDS.
DISTILL_FIELDS = ("contrastive_loss", "distill_loss")
# A run stops when its first batches (at least 2, and this many samples) hold no readable sample: the data source
# is broken (issue 16: a csv of missing files trained to a NaN loss and wrote an untrained model).
EMPTY_START_SAMPLES = 64


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite and `run.nonfinite` is "stop"."""


@dataclass
class TrainResult:
    """What a finished run produced: `eval` on the synthetic held-out scenes, `eval_data` zero-shot on
    `run.eval_data`, `val` on the held-out training samples (each None when not evaluated)."""

    run_dir: Path
    step: int
    loss: float
    eval: EvalResult | None
    wall_s: float
    samples_per_s: float
    eval_data: ZeroShotResult | None = None
    val: ValidationResult | None = None


def tiny_clip_config(m: ModelConfig, loss: str = "clip") -> CLIPConfig:
    """The `CLIPConfig` of `model.name: tiny`, from the model section's size fields.

    With the sigmoid loss the temperature starts at ln 10 and a logit bias at -10 (SigLIP paper, section 3).
    """
    vision = VisionTransformerConfig(image_size=m.image_size, patch_size=m.patch_size, width=m.vision_width,
                                     layers=m.vision_layers, heads=m.vision_heads)  # fmt: skip
    text = TextConfig(context_length=m.context_length, width=m.text_width, layers=m.text_layers, heads=m.text_heads)
    if loss == "siglip":
        return CLIPConfig(m.embed_dim, vision, text, init_logit_scale=math.log(10), init_logit_bias=-10.0)
    return CLIPConfig(embed_dim=m.embed_dim, vision=vision, text=text)


def build_model(m: ModelConfig, loss: str = "clip"):
    """(model in train mode, its tokenizer) for the model section: locked towers get no gradients but their top
    `lock_*_unlocked_*` groups, patch dropout is set, and the sigmoid loss gives a model without a logit bias one
    (`add_siglip_bias`).

    Raises:
        ValueError: a setting the model cannot take (unlocked groups of a tower other than a ViT, patch dropout on
            an image tower without patches, BatchNorm statistics to freeze where there is no BatchNorm).
    """
    from ..factory import create_model, get_tokenizer
    from ..tokenizer import Tokenizer

    weights = m.pretrained is not None or ":" in m.name
    if m.name == "tiny":
        model, tokenizer = create_model(tiny_clip_config(m, loss), m.pretrained), Tokenizer(m.context_length)
    else:
        model = create_model(m.name, m.pretrained, load_weights=weights)
        tokenizer = get_tokenizer(model)  # the one the weights came with (a checkpoint directory may name its own)
    if m.lock_image:  # OpenCLIP's --lock-image*: LiT, the top groups optionally left to train
        model.lock_image_tower(m.lock_image_unlocked_groups, m.lock_image_freeze_bn_stats)
    if m.lock_text:
        model.lock_text_tower(m.lock_text_unlocked_layers, m.lock_text_freeze_layer_norm)
    if loss == "siglip" and model.logit_bias is None:
        add_siglip_bias(model, pretrained=weights)
    model.set_patch_dropout(m.patch_dropout)
    model.set_grad_checkpointing(m.grad_checkpointing)
    return model.train(), tokenizer


def build_teacher(spec: str, student, device: torch.device) -> nn.Module:
    """The teacher of `loss.distill_model`: `spec`'s weights, frozen, in eval mode, on `device`.

    Raises:
        ValueError: `spec` names no weights, or the teacher takes images or tokens otherwise than `student` does
            (image size, mean and std; tokenizer), naming both.
    """
    from dataclasses import replace

    from ..factory import create_model

    with torch.random.fork_rng(devices=[]):  # building it draws random weights first: the run's seed stream stays
        teacher = create_model(spec, require_pretrained=True, device=device)
    mine, theirs = student.preprocess_config, teacher.preprocess_config
    if theirs is None or (theirs.image_size, theirs.mean, theirs.std) != (mine.image_size, mine.mean, mine.std):
        seen = None if theirs is None else (theirs.image_size, theirs.mean, theirs.std)
        raise ValueError(f"loss.distill_model {spec!r} takes images as (size, mean, std) {seen}, the student as "
                         f"{(mine.image_size, mine.mean, mine.std)}: pick a teacher with the student's preprocessing")
    t_tok, s_tok = teacher.tokenizer_config, student.tokenizer_config
    if replace(t_tok, context_length=0) != replace(s_tok, context_length=0) or \
            s_tok.context_length > t_tok.context_length:  # fmt: skip
        raise ValueError(f"loss.distill_model {spec!r} reads tokens of {t_tok}, the student makes {s_tok}: pick a "
                         "teacher with the student's tokenizer")  # fmt: skip
    return teacher.requires_grad_(False).eval()


def add_siglip_bias(model, pretrained: bool) -> None:
    """Give a model without a logit bias one for the sigmoid loss, as OpenCLIP's --siglip does: a model built from
    scratch starts at SigLIP's temperature and bias (scale ln 10, bias -10; Zhai et al. 2023, sec. 3.2); pretrained
    weights keep their learned scale and get bias 0, so that the model's logits stay those it was trained to
    (OpenCLIP's `load_checkpoint`, its issue 712). The config records SigLIP's initial values either way, as
    OpenCLIP's model config does, so that the saved model reloads with its bias."""
    from .losses import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE

    model.add_logit_bias(0.0 if pretrained else SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE,
                         SIGLIP_INIT_LOGIT_BIAS)  # fmt: skip
    if not pretrained:
        with torch.no_grad():
            model.logit_scale.fill_(SIGLIP_INIT_LOGIT_SCALE)


class Runner:
    """One run's moving parts (model, optimiser, schedule, loss, data position); `fit()` trains it."""

    def __init__(self, cfg: TrainConfig, dist: Distributed, run_dir: Path):
        from ..transforms import image_transform
        from .losses import build_loss

        self.cfg, self.dist, self.run_dir = cfg, dist, run_dir
        if cfg.run.wandb:  # a missing package stops the run before anything is built, on every process
            import_wandb()
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        model, self.tokenizer = build_model(cfg.model, cfg.loss.kind)
        self.model = model.to(dist.device)
        self.preprocess = model.preprocess_config
        self.ddp = wrap_model(self.model, dist)  # what the steps call: the model, DDP around it, or FSDP-sharded
        # compiled around DDP, as PyTorch recommends; `self.model` (saved, evaluated) stays the plain module
        self.ddp = torch.compile(self.ddp) if cfg.run.compile else self.ddp
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.run.steps)
        lc = cfg.loss
        self.teacher = None if lc.distill_model is None else build_teacher(lc.distill_model, model, dist.device)
        self.loss_parts = None  # the last step's DistillLoss, when distilling
        self.loss_fn = build_loss(lc.kind, distill=self.teacher is not None, local_loss=lc.local_loss,
                                  gather_with_grad=lc.gather_with_grad, chunk_size=lc.chunk_size)  # fmt: skip
        # "auto" asks the device once (clipworks.hardware), not on every step
        self._bf16 = resolve_precision(cfg.run.precision, dist.device.type) == "bf16"
        self.train_transform = image_transform(self.preprocess, cfg.data.augment, augment_config(cfg.data))
        self.step, self.position, self.skipped, self.skipped_steps = 0, DataPosition(), 0, 0
        self.loss, self.last_eval, self.train_s, self.samples = math.nan, None, 0.0, 0
        self.updates, self._fed, self._empty_batches, self._empty_skipped = 0, False, 0, 0
        self._saved_step, self._estimate = None, TimeEstimate(cfg.run.steps)
        if dist.main:
            remove_stale_temporaries(run_dir)
        self._resume()
        if not same_everywhere(self.step, dist.device):  # a rank that found no checkpoint would start at step 0
            raise ValueError("the processes resumed at different steps: run.out_dir (and run.resume) must be on a file "
                             "system every machine shares")  # fmt: skip
        self._start_step = self.step
        # A missing or broken source (training or evaluation) fails here, before the run directory exists.
        self.loader = self._loader()
        self.held_out: HeldOut | None = None
        if cfg.data.val_size:  # on every rank: none trains on it
            batch = cfg.data.batch_size * dist.world_size
            self.held_out = hold_out(self.loader, cfg.data.train, cfg.data.val_size, batch)
        self.evaluator, error = None, None
        if dist.main or dist.sharded:  # a sharded model evaluates on every rank
            try:
                self.evaluator = Evaluator.create(cfg, image_transform(self.preprocess), self.tokenizer, self.held_out,
                                                  dist.world_size)  # fmt: skip
            except (ValueError, OSError) as e:
                error = e
        if not everywhere(error is None, dist.device):  # every rank stops, not only the one that evaluates
            raise error or ValueError("the evaluation data could not be read (rank 0 says why)")
        if dist.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
            tensorboard = run_dir / "tensorboard" if cfg.run.tensorboard else None
            fields = METRIC_FIELDS + (DISTILL_FIELDS if self.teacher is not None else ()) + (
                self.evaluator.fields if self.evaluator else ())  # fmt: skip
            resumed = self._start_step > 0
            wandb = start_wandb(run_dir, cfg.run.wandb_project, cfg.to_dict(), resumed) if cfg.run.wandb else None
            self.metrics = MetricsLog(run_dir / "metrics.csv", tensorboard, fields, wandb)

    def _resume(self) -> None:
        resumed = load_resume(self.cfg.run.resume, self.run_dir)
        if resumed is None:
            if self.cfg.run.resume is None and latest_checkpoint(self.run_dir) is not None:
                raise ValueError(f"{self.run_dir} already holds checkpoints: continue it with --run.resume latest, "
                                 "or pass a new --run.out_dir")  # fmt: skip
            return
        path, state = resumed
        load_full_state(self.model, self.optimizer, state["model"], state["optimizer"], self.dist)
        self.scheduler.load_state_dict(state["scheduler"])
        follow_config(self.scheduler, self.cfg.optim, self.cfg.run.steps)
        self.step = state["step"]
        self.position = DataPosition(**state["data"])
        set_rng_state(state["rng"])
        if self.dist.main:
            print(f"resumed from {path} at step {self.step}")

    def _loader(self):
        from ..data.datasets import StreamOptions, make_loader

        c, d = self.cfg, self.dist
        stream = StreamOptions(resampled=c.data.resampled, train_num_samples=c.data.train_num_samples,
                               upsampling_factors=c.data.upsampling_factors, shard_retries=c.data.shard_retries,
                               max_failed_shards=c.data.max_failed_shards)  # fmt: skip
        return make_loader(c.data.train, self.train_transform, self.tokenizer, batch_size=c.data.batch_size,
                           workers=c.data.workers, seed=c.run.seed, rank=d.rank, world_size=d.world_size,
                           epoch=self.position.epoch, start_step=self.position.step_in_epoch,
                           stream=stream)  # fmt: skip

    def fit(self) -> TrainResult:
        """Train up to `run.steps`, evaluate, save the final model; returns the result.

        Raises:
            TrainingInterrupted: Ctrl-C; the run stopped after the step it was in, and saved a checkpoint there.
        """
        from tqdm import tqdm

        from ..data.datasets import set_epoch

        steps, loader = self.cfg.run.steps, self.loader
        show = self.cfg.run.progress and self.dist.main
        if self.dist.main:
            print("\n".join(self._plan()), flush=True)
        bar = tqdm(total=steps, initial=self.step, unit="step", mininterval=1.0, disable=not show)
        self._tick = self._window_start = time.perf_counter()
        self._window_samples, stopped = 0, False
        with StopRequest() as stop:  # installed before the loader forks its workers, which then ignore Ctrl-C
            while self.step < steps and not stopped:
                seen = 0
                for seen, batch in enumerate(stop.batches(loader), 1):
                    if not self._fed:
                        self._check_fed(batch)
                    self.loss = self._train_step(batch)
                    self.step, self.position.step_in_epoch = self.step + 1, self.position.step_in_epoch + 1
                    self._after_step(batch, bar)
                    stopped = not everywhere(not stop.requested, self.dist.device)  # every rank stops at this step
                    if stopped or self.step >= steps:
                        break
                else:
                    stopped = not everywhere(not stop.requested, self.dist.device)
                    if stopped:  # a worker that died of the same Ctrl-C ended the batches: between two steps
                        break
                    if seen == 0 and self.position.step_in_epoch == 0:
                        raise ValueError(f"{self.cfg.data.train} gives no full batch of {self.cfg.data.batch_size}")
                    self.position = DataPosition(self.position.epoch + 1, 0)
                    set_epoch(loader, self.position.epoch, 0)
            bar.close()
            if stopped:
                raise self._interrupted()
        return self._finish()

    def _plan(self) -> list[str]:
        params = list(self.model.parameters())
        counts = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
        dataset, held = self.loader.dataset, self.held_out
        samples = len(dataset) if hasattr(dataset, "__len__") else None
        if held is not None:
            samples = held.train_samples
        evals = self.evaluator.describe(self.cfg, held) if self.evaluator else []
        return plan_lines(self.cfg, self.run_dir, counts, samples, evals, self._start_step, str(self.dist.device),
                          held.size if held is not None and held.shard is None else 0, self.dist.world_size)  # fmt: skip

    def _interrupted(self) -> TrainingInterrupted:
        """Save the state at this step (between two steps: consistent) unless saved already; the exception that
        says where it went."""
        if self.updates and self._saved_step != self.step:
            self._save()
        if self.dist.main:
            self.metrics.close()
        saved = self._saved_step == self.step
        checkpoint = checkpoint_dir(self.run_dir, self.step) if saved else latest_checkpoint(self.run_dir)
        return TrainingInterrupted(self.run_dir, self.step, checkpoint, saved, self.dist.world_size)

    def _check_fed(self, batch) -> None:
        """Stop a run whose first batches hold no readable sample on any process; checking ends at the first batch
        that holds one. Every process counts the same batches, so all stop together."""
        self._fed = not everywhere(len(batch.images) == 0, self.dist.device)
        if self._fed:
            return
        self._empty_batches, self._empty_skipped = self._empty_batches + 1, self._empty_skipped + batch.skipped
        if self._empty_batches >= max(2, math.ceil(EMPTY_START_SAMPLES / self.cfg.data.batch_size)):
            raise ValueError(f"{self.cfg.data.train}: all {self._empty_skipped} samples of the first "
                             f"{self._empty_batches} batches were skipped (missing or unreadable images, or empty "
                             "captions); nothing to train on")  # fmt: skip

    def _skip_update(self) -> None:
        """No update this step, but the schedule moves on (a skipped step still counts toward `run.steps`)."""
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # PyTorch warns when the schedule steps without the optimiser: intended
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        self.skipped_steps += 1

    def _autocast(self):
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self._bf16)

    def _train_step(self, batch) -> float:
        dev = self.dist.device
        if not everywhere(len(batch.images) > 0, dev):  # every sample of a batch was broken (and counted)
            self._skip_update()
            return float("nan")
        images, tokens = batch.images.to(dev, non_blocking=True), batch.tokens.to(dev, non_blocking=True)
        with self._autocast():
            if self.cfg.optim.accum_steps > 1:
                loss, backward = self._cached_loss(images, tokens)
            else:
                out = self.ddp(images, tokens)
                loss = self._loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias, images,
                                  tokens)  # fmt: skip
                backward = loss.backward
        if not everywhere(bool(torch.isfinite(loss.detach())), dev):
            if self.cfg.run.nonfinite == "stop":
                raise NonFiniteLossError(f"non-finite loss ({loss.item()}) at step {self.step + 1}; set "
                                         "run.nonfinite: skip to skip such steps")  # fmt: skip
            self._skip_update()
            return loss.item()
        backward()
        sync_replicated_grads(self.model, self.dist)
        if self.cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.updates += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            from .losses import clamp_logit_scale_

            clamp_logit_scale_(self.model)
        return loss.item()

    def _loss(self, image_f, text_f, scale, bias, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The batch's loss from the student's outputs; with a teacher, the sum of `DistillClipLoss`'s parts (kept
        for the metrics row), the teacher's features computed without gradients, in the micro-batches of
        `optim.accum_steps` (GradCache then back-propagates the whole loss as it does the contrastive one)."""
        if self.teacher is None:
            return self.loss_fn(image_f, text_f, scale, bias)
        with torch.no_grad():
            n = self.cfg.optim.accum_steps
            outs = [self.teacher(i, t) for i, t in zip(images.tensor_split(n), tokens.tensor_split(n)) if len(i)]
        teacher = [torch.cat([o.image_features for o in outs]), torch.cat([o.text_features for o in outs])]
        self.loss_parts = self.loss_fn(image_f, text_f, scale, *teacher, outs[0].logit_scale, logit_bias=bias)
        return self.loss_parts.total

    def _cached_loss(self, images: torch.Tensor, tokens: torch.Tensor):
        """The whole batch's loss from features computed in micro-batches without gradients, and a function that
        back-propagates it micro-batch by micro-batch (GradCache: the loss gives each cached feature's gradient,
        then each micro-batch runs again with gradients and receives its share). Same gradients as one pass."""
        chunks = [c for c in zip(images.tensor_split(self.cfg.optim.accum_steps), tokens.tensor_split(
            self.cfg.optim.accum_steps)) if len(c[0])]  # fmt: skip
        states, outs = [], []
        with torch.no_grad():
            for i, t in chunks:  # each micro-batch's random draws (patch dropout) are replayed when it runs again
                states.append(_rng_state(self.dist.device))
                outs.append(self.model(i, t))
        image_f = torch.cat([o.image_features for o in outs]).requires_grad_()
        text_f = torch.cat([o.text_features for o in outs]).requires_grad_()
        scale = outs[0].logit_scale.detach().requires_grad_()
        bias = None if outs[0].logit_bias is None else outs[0].logit_bias.detach().requires_grad_()
        loss = self._loss(image_f, text_f, scale, bias, images, tokens)

        def backward() -> None:
            loss.backward()
            sizes = [len(i) for i, _ in chunks]
            grads = list(zip(image_f.grad.split(sizes), text_f.grad.split(sizes)))
            for j, (i, t) in enumerate(chunks):
                last = j == len(chunks) - 1
                # DDP all-reduces gradients once, after the last micro-batch
                sync = contextlib.nullcontext() if last or not hasattr(self.ddp, "no_sync") else self.ddp.no_sync()
                with sync:
                    with self._autocast(), _replayed_rng(states[j], self.dist.device):
                        out = self.ddp(i, t)
                    pairs = [(out.image_features, grads[j][0]), (out.text_features, grads[j][1])]
                    if last:  # the temperature (and bias) enter once, with their gradient from the whole loss
                        pairs += [(out.logit_scale, scale.grad), (out.logit_bias, None if bias is None else bias.grad)]
                    pairs = [(x, g) for x, g in pairs if x is not None and x.requires_grad]
                    torch.autograd.backward([x for x, _ in pairs], [g for _, g in pairs])

        return loss, backward

    def _after_step(self, batch, bar) -> None:
        now, run = time.perf_counter(), self.cfg.run
        n = len(batch.images) * self.dist.world_size
        self.train_s, self.samples, self._window_samples = self.train_s + now - self._tick, self.samples + n, \
            self._window_samples + n  # fmt: skip
        self.skipped += batch.skipped
        rate = self._window_samples / max(now - self._window_start, 1e-9)
        bar.set_postfix(loss=f"{self.loss:.4f}", samples_s=f"{rate:.0f}")
        bar.update(1)
        estimate = self._estimate.update(self.step, self.train_s, self.samples)
        if estimate and self.dist.main:
            bar.write(estimate)
        last = self.step == run.steps
        evaluate = self.evaluator is not None and ((run.eval_every and self.step % run.eval_every == 0) or last)
        result = self.evaluator.evaluate(self.model, self.dist.device) if evaluate else None
        if result is not None:
            self.last_eval = result
            if self.dist.main:
                for line in result.lines():
                    bar.write(f"step {self.step}: {line}")
        logged = self.dist.main and (self.step % run.log_every == 0 or result is not None or last)
        if logged:
            self.metrics.write(step=self.step, loss=self.loss, lr=self.scheduler.get_last_lr()[0],
                               logit_scale=self.model.logit_scale.exp().item(), samples_per_s=rate,
                               skipped=self.skipped, skipped_steps=self.skipped_steps,
                               **({k: v.item() for k, v in zip(DISTILL_FIELDS, self.loss_parts)} if self.loss_parts
                                  else {}), **(result.columns() if result else {}))  # fmt: skip
        if ((run.save_every and self.step % run.save_every == 0) or last) and self.updates:  # else nothing learnt
            self._save()
        self._tick = time.perf_counter()  # evaluation and saving count neither as training time nor in samples/s
        if logged:
            self._window_start, self._window_samples = self._tick, 0

    def _save(self) -> None:
        """A run-state checkpoint (gathering the whole state from every rank under FSDP; rank 0 writes)."""
        if not (self.dist.main or self.dist.sharded):
            return
        model_state = full_model_state(self.model, self.dist)
        optim_state = full_optimizer_state(self.model, self.optimizer, self.dist)
        if self.dist.main:
            path = save_checkpoint(self.run_dir, self.step, model_state, optim_state, self.scheduler.state_dict(),
                                   self.position)  # fmt: skip
            remove_old_checkpoints(self.run_dir, self.cfg.run.keep_checkpoints, self.cfg.run.keep_every, path)
        self._saved_step = self.step

    def _final_model(self) -> nn.Module | None:
        """The trained model, whole, on rank 0 (None elsewhere); under FSDP gathered from every rank."""
        if not self.dist.sharded:
            return self.model if self.dist.main else None
        from ..models.clip import CLIP

        state = full_model_state(self.model, self.dist)
        if not self.dist.main:
            return None
        model = CLIP(self.model.config)
        model.load_state_dict(state)
        model.tokenizer_config = self.model.tokenizer_config  # a fine-tuned SigLIP keeps its own tokenizer
        return model

    def _finish(self) -> TrainResult:
        from ..checkpoints.export import save_pretrained

        if self.step > self._start_step and self.updates == 0:  # never write an untrained model as a result
            raise ValueError(f"none of the {self.step - self._start_step} steps of this run updated the model ("
                             f"{self.skipped} samples of {self.cfg.data.train} skipped as missing, unreadable or "
                             "uncaptioned, the other steps' losses not finite); no model written")  # fmt: skip
        if self.evaluator is not None and self.last_eval is None:
            self.last_eval = self.evaluator.evaluate(self.model, self.dist.device)
        last = self.last_eval or Evaluation()
        final = self._final_model()
        if self.dist.main:
            save_pretrained(final, self.run_dir / "model", preprocess=self.preprocess)
            from .plot import plot_metrics

            chance, data = last.synthetic and last.synthetic.chance, last.data
            plot_metrics(self.metrics.path, self.run_dir / "curves.png", chance, eval_name=data and data.name,
                         eval_chance=data and data.chance)  # fmt: skip
            self.metrics.close()
        rate = self.samples / max(self.train_s, 1e-9)
        result = TrainResult(self.run_dir, self.step, self.loss, last.synthetic, self.train_s, rate, last.data,
                             last.val)  # fmt: skip
        if self.dist.main:
            print(f"trained to step {self.step}: loss {self.loss:.4f}, {rate:.0f} samples/s, "
                  f"{self.train_s:.0f} s training")  # fmt: skip
            if last.synthetic is not None:
                print(f"held-out: {last.synthetic.format()}")
            for done in (last.data, last.val):
                if done is not None:
                    print(f"final: {done.format()}")
            print(f"model: {self.run_dir / 'model'} (clipworks.create_model('local-dir:{self.run_dir / 'model'}'))")
        return result


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _replayed_rng(state: tuple, device: torch.device):
    """Random draws as they were at `state` (`_rng_state`); the streams continue afterwards as before."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _run_dir(cfg: TrainConfig, dist: Distributed) -> Path:
    if cfg.run.out_dir is not None:
        return Path(cfg.run.out_dir)
    if dist.world_size > 1:
        raise ValueError("under torchrun set --run.out_dir, so that every process writes to the same run")
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def train(cfg: TrainConfig) -> TrainResult:
    """Train a CLIP model as `cfg` says; returns where the run went and how it ended.

    Writes `config.yaml`, `metrics.csv`, `curves.png` and `curves.svg` (loss, learning rate and zero-shot curves;
    with the `plots` extra), `checkpoints/step_NNNNNNNN/`
    and the final model (`model/`, loadable
    with `clipworks.create_model("local-dir:RUN/model")`) into the run directory.

    Raises:
        NonFiniteLossError: a NaN or infinite loss with `run.nonfinite: stop` (on every rank, naming the step).
        ValueError: a bad config or data source; a source whose first batches hold no readable sample; a run in
            which no step updated the model (then no model is written); no intact checkpoint to resume from.
        TrainingInterrupted: Ctrl-C (a KeyboardInterrupt): the run stopped after its current step and saved a
            checkpoint there, which it names with the command that resumes it (a second Ctrl-C quits at once).

    A run that fails or is interrupted before any step updated the model removes the run directory it created.
    """
    cfg.validate()
    dist = setup_distributed(cfg.run.device, cfg.run.parallel)
    run_dir, runner = _run_dir(cfg, dist), None
    created = missing_dirs(run_dir) if dist.main else []  # a run that fails before learning anything removes them
    try:
        runner = Runner(cfg, dist, run_dir)
        return runner.fit()
    except BaseException as e:
        if runner is None or runner.updates == 0:
            remove_created(created)
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, TrainingInterrupted):  # before training, or a
            latest = latest_checkpoint(run_dir) if run_dir.is_dir() else None  # second Ctrl-C: an older checkpoint
            step = None if runner is None else runner.step
            raise TrainingInterrupted(run_dir, step, latest, False, dist.world_size) from None
        raise
    finally:
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()
