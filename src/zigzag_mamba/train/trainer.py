"""A plain-PyTorch trainer for interpolant models, on one process or many (torchrun + DDP).

Per optimizer step every process runs ``grad_accum`` micro-steps; the noise, times and label
dropout of each micro-step are drawn for the global micro-batch from one seeded generator and
each process keeps its own rows, so the run does not depend on how many processes share it.
Gradients are clipped before ``optimizer.step()``, then the EMA is updated.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from zigzag_mamba.train.checkpoint import (
    CHECKPOINT_KEYS,
    CheckpointError,
    another_model,
    load_checkpoint_or_previous,
    previous_path,
    remove_checkpoint,
    remove_stale_temporaries,
    restore_rng_states,
    rng_states,
    same_file,
    save_checkpoint,
)
from zigzag_mamba.train.config import TrainConfig
from zigzag_mamba.train.ema import EMA
from zigzag_mamba.train.images import save_samples
from zigzag_mamba.train.interpolant import Interpolant
from zigzag_mamba.train.loader import BatchStream, setup_distributed
from zigzag_mamba.train.lock import RunLock
from zigzag_mamba.train.runlog import LossLog, Meter, progress_bar
from zigzag_mamba.train.samplers import generate

Metric = Callable[[Tensor, Tensor | None], dict[str, float]]
#: Sample grids of labelled data show one class a row, for at most this many classes.
MAX_CLASS_ROWS = 16


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient and stopped."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only.

    Parameters with fewer than two dimensions (biases, norm gains) and those tagged
    ``_no_weight_decay = True`` (Mamba's ``A_log`` and ``D``) are not decayed.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or getattr(param, "_no_weight_decay", False)
        (no_decay if skip else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class Trainer:
    """Trains ``model(x_t, t, y)`` (or ``model(x_t, t)`` on unlabelled data) on ``dataset``.

    Args:
        model: any module mapping ``(x, t, y)`` to ``x``'s shape; for classifier-free guidance
            its class table needs a null row, id ``dataset.num_classes``.
        dataset: yields ``(x, label)``; its ``num_classes`` (0: unlabelled) selects the mode.
        config: a :class:`TrainConfig`.
        model_config: how to rebuild the model, stored in checkpoints for ``zigma sample``.
        metrics: callables ``metric(samples, labels) -> {name: value}``, run on
            ``config.eval_samples`` EMA samples with every sample grid (see
            :class:`~zigzag_mamba.train.metrics.FrechetDistance`).

    Example::

        >>> from zigzag_mamba import CONFIGS, ZigMaBackbone
        >>> from zigzag_mamba.train import DigitsDataset, TrainConfig
        >>> net = ZigMaBackbone(input_size=8, in_channels=1, num_classes=10, **CONFIGS["ZigMa-T/2"])
        >>> config = TrainConfig(steps=2, batch_size=8, sample_steps=2, out_dir="run")
        >>> trainer = Trainer(net, DigitsDataset(), config)
        >>> trainer.fit()["step"]        # fit(resume="auto") continues a run
        2
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        config: TrainConfig,
        *,
        model_config: dict[str, Any] | None = None,
        metrics: Sequence[Metric] = (),
    ) -> None:
        self.config = config
        self.model_config = dict(model_config or {})
        self.metrics = list(metrics)
        self.shard, self.device = setup_distributed(config.device)
        self.main = self.shard.rank == 0
        self.out_dir = Path(config.out_dir)
        self.num_classes = int(getattr(dataset, "num_classes", 0))
        self.interpolant = Interpolant(
            config.path,
            config.prediction,
            config.weighting,
            train_eps=config.train_eps,
            sample_eps=config.sample_eps,
        )
        self.model = model.to(self.device)
        if config.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ValueError(f"{type(model).__name__} has no set_grad_checkpointing()")
            model.set_grad_checkpointing(True)
        self.ema = EMA(self.model, config.ema_decay)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, config.weight_decay),
            lr=config.lr,
            betas=(config.beta1, config.beta2),
        )
        wrapped = self.model
        if self.shard.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.wrapped = wrapped
        self.forward = torch.compile(wrapped) if config.compile else wrapped
        self.bf16 = config.precision == "bf16" or (
            config.precision == "auto"
            and self.device.type == "cuda"
            and torch.cuda.is_bf16_supported()
        )
        self.micro_batch = self._micro_batch()
        self.batches = BatchStream(
            dataset,
            self.micro_batch,
            seed=config.seed,
            shard=self.shard,
            num_workers=config.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.step = 0
        self.checkpoint_path = self.out_dir / "checkpoints" / "last.pt"
        # The newest checkpoint known good: written by this run, or verified when resumed.
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self.codec = None
        if config.vae and self.main:  # loaded and checked now, not at the first sample grid
            from zigzag_mamba.train.vae import LatentCodec

            self.codec = LatentCodec.load(config.vae, self.device)
            self.codec.check_data(dataset, "the training data")

    def _micro_batch(self) -> int:
        per_step = self.shard.world * self.config.grad_accum
        if self.config.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.config.batch_size} must be a multiple of processes x "
                f"grad_accum = {per_step}"
            )
        return self.config.batch_size // per_step

    # -- one optimizer step -----------------------------------------------------------------

    def _draw(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Noise, times and label-dropout mask for the global micro-batch; keep this rank's rows."""
        rows = x.shape[0] * self.shard.world
        g = self.generator
        noise = torch.randn((rows, *x.shape[1:]), generator=g, device=self.device)
        t = self.interpolant.sample_time(rows, generator=g, device=self.device)
        drop = torch.rand(rows, generator=g, device=self.device) < self.config.cfg_dropout
        mine = slice(self.shard.rank, None, self.shard.world)
        return noise[mine].to(x.dtype), t[mine], drop[mine]

    def _micro_step(self, x: Tensor, y: Tensor, last: bool) -> Tensor:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        noise, t, drop = self._draw(x)
        if self.num_classes:
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
            model_fn = lambda x_t, t: self.forward(x_t, t, y)
        else:
            model_fn = lambda x_t, t: self.forward(x_t, t)
        sync = last or self.shard.world == 1
        no_sync = contextlib.nullcontext() if sync else self.wrapped.no_sync()
        with no_sync:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.interpolant.loss(model_fn, x, noise=noise, t=t)
            mean_loss = self._global_mean(loss.detach())
            self._stop_if_not_finite(mean_loss, "loss")
            (loss / self.config.grad_accum).backward()
        return mean_loss

    def _global_mean(self, value: Tensor) -> Tensor:
        if self.shard.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.shard.world
        return value

    def _stop_if_not_finite(self, value: Tensor, what: str) -> None:
        if math.isfinite(value.item()):
            return
        if self.last_checkpoint is None:
            kept = "no checkpoint had been written yet"
        elif self.last_checkpoint == self.resumed_from:
            kept = f"the checkpoint it resumed from (verified), {self.last_checkpoint}, is kept"
        else:
            kept = f"the last checkpoint it wrote, {self.last_checkpoint}, is kept"
        raise NonFiniteLossError(
            f"the {what} became {value.item()} at step {self.step + 1}, so training stopped; "
            f"{kept}. Try a lower learning rate, keep gradient clipping on, or check the data "
            "for NaN/inf values."
        )

    def _optimizer_step(self) -> tuple[float, float]:
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        losses = [
            self._micro_step(*next(self.batches), last=k == cfg.grad_accum - 1)
            for k in range(cfg.grad_accum)
        ]
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # before the step
        self._stop_if_not_finite(grad_norm, "gradient norm")
        lr = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.ema.update(self.model, self.step)
        self.step += 1
        return torch.stack(losses).mean().item(), grad_norm.item()

    # -- the loop ---------------------------------------------------------------------------

    def fit(self, resume: str | Path | None = None) -> dict[str, Any]:
        """Train until ``config.steps`` (or ``config.max_seconds``).

        ``resume`` is a checkpoint path, or ``"auto"`` for the run's own last checkpoint if
        there is one (see :meth:`resume`). The run folder is locked for the whole run
        (:class:`~zigzag_mamba.train.lock.RunLock`): a second trainer writing into it is
        refused before it writes anything. Returns a summary of the run.
        """
        with RunLock(self.out_dir) if self.main else contextlib.nullcontext():
            if self.main:  # what saves killed midway left behind
                for folder in (self.out_dir, self.checkpoint_path.parent):
                    remove_stale_temporaries(folder)
            if resume is not None:
                self.resume(resume)
            return self._train()

    def _train(self) -> dict[str, Any]:
        cfg = self.config
        log = LossLog(self.out_dir / "loss.csv", self.step) if self.main else None
        bar = progress_bar(cfg, self.step) if self.main else None
        meter = Meter()
        loss = math.nan
        try:
            while self.step < cfg.steps:
                loss, grad_norm = self._optimizer_step()
                meter.add(loss, cfg.batch_size)
                done = self.step == cfg.steps or self._out_of_time(meter.start)
                if done or self.step % cfg.log_every == 0:
                    row = meter.row(self.step, self.batches.epoch, grad_norm, self._lr())
                    if log is not None:
                        log.write(row)
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{row['loss']:.4f}", img_s=f"{row['samples_per_s']:.1f}"
                        )
                if bar is not None:
                    bar.update(1)
                self._periodic(done)
                if done:
                    break
        finally:
            if bar is not None:
                bar.close()
        return {"step": self.step, "loss": loss, "checkpoint": self.last_checkpoint}

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _out_of_time(self, start: float) -> bool:
        if not self.config.max_seconds:
            return False
        late = torch.tensor(float(time.perf_counter() - start > self.config.max_seconds))
        if self.shard.world > 1:  # the main process's clock decides for everyone
            late = late.to(self.device)
            dist.broadcast(late, src=0)
        return bool(late.item())

    def _periodic(self, done: bool) -> None:
        cfg = self.config
        if done or (cfg.sample_every and self.step % cfg.sample_every == 0):
            self.sample_grid()
            self._run_metrics()
        if done or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0):
            self.save()

    # -- sampling and evaluation ------------------------------------------------------------

    def grid_rows(self) -> int:
        """Rows of the sample grids: ``config.grid_rows``, or when that is 0, one per class of
        labelled data (at most :data:`MAX_CLASS_ROWS`), else 8."""
        if self.config.grid_rows:
            return self.config.grid_rows
        return min(self.num_classes, MAX_CLASS_ROWS) if self.num_classes else 8

    def sample(self, count: int, *, seed: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Draw ``count`` EMA samples; on labelled data, row i of ``grid_columns`` samples has
        class ``i % num_classes``, so a grid of :meth:`grid_rows` rows shows one class a row."""
        cfg = self.config
        shape = self._sample_shape()
        g = torch.Generator(self.device).manual_seed(cfg.seed + 1 if seed is None else seed)
        noise = torch.randn((count, *shape), generator=g, device=self.device)
        labels = None
        if self.num_classes:
            rows = torch.arange(count, device=self.device) // cfg.grid_columns
            labels = rows % self.num_classes
        samples = generate(
            self.ema.module,
            noise,
            labels=labels,
            interpolant=self.interpolant,
            cfg_scale=cfg.cfg_scale,
            null_label=self.num_classes if cfg.cfg_dropout > 0 else None,
            method=cfg.sample_method,
            num_steps=cfg.sample_steps,
        )
        return samples, labels

    def _sample_shape(self) -> tuple[int, ...]:
        x, _ = self.batches.dataset[0]
        return tuple(x.shape)

    def sample_grid(self) -> Path | None:
        """Write a grid of EMA samples to ``samples/step_XXXXXXX.png`` (main process only);
        clips go there as frame strips, and as an animated GIF beside it (:func:`save_samples`).
        With ``config.vae``, latents are decoded to images first."""
        if not self.main:
            return None
        cfg = self.config
        samples, _ = self.sample(self.grid_rows() * cfg.grid_columns)
        if self.codec is not None:
            samples = self.codec.decode(samples)
        path = self.out_dir / "samples" / f"step_{self.step:07d}.png"
        return save_samples(samples, path, cfg.grid_columns)[0]

    def _run_metrics(self) -> None:
        if not (self.main and self.metrics and self.config.eval_samples):
            return
        samples, labels = self.sample(self.config.eval_samples, seed=self.config.seed + 2)
        results: dict[str, Any] = {"step": self.step}
        for metric in self.metrics:
            results.update(metric(samples, labels))
        with open(self.out_dir / "metrics.jsonl", "a") as file:
            file.write(json.dumps(results) + "\n")

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "data": self.batches.state_dict(),
            "rng": rng_states(self.generator),
            "config": {"train": self.config.to_dict(), "model": self.model_config},
        }

    def save(self) -> Path:
        """Checkpoint atomically to ``checkpoints/last.pt`` (main process writes), with its
        SHA-256 beside it; the checkpoint it replaces becomes ``previous.pt`` when it is known
        good (written by this run, or the one it resumed from)."""
        if self.main:
            good, last = self.last_checkpoint, self.checkpoint_path
            previous = previous_path(last)
            if not any(same_file(good, path) for path in (last, previous)):
                # Files of another run in this folder: never a fallback for this one.
                remove_checkpoint(previous)
            save_checkpoint(self.state_dict(), last, rotate=same_file(good, last))
        if self.shard.world > 1:
            dist.barrier()
        self.last_checkpoint = self.checkpoint_path
        return self.checkpoint_path

    def resume(self, resume: str | Path) -> None:
        """Continue from a checkpoint: a path, or ``"auto"`` for the run's own ``last.pt`` if
        there is one (else nothing happens). The checkpoint is verified against its hash; when
        ``last.pt`` fails (or is missing after a kill mid-save), ``previous.pt`` is loaded, with
        a warning."""
        auto = resume == "auto"
        path = self.checkpoint_path if auto else Path(resume)
        if auto and not path.is_file() and not previous_path(path).is_file():
            return
        # On the CPU: RNG states must stay there.
        state, used = load_checkpoint_or_previous(path, required=CHECKPOINT_KEYS)
        try:
            self.model.load_state_dict(state["model"])
            self.ema.module.load_state_dict(state["ema"])
        except RuntimeError as exc:
            saved = state["config"].get("model") if isinstance(state["config"], dict) else None
            raise CheckpointError(another_model(used, saved, self.model_config, exc)) from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["data"])
        restore_rng_states(state["rng"], self.generator)
        self.step = int(state["step"])
        self.last_checkpoint = self.resumed_from = used
        if self.step > self.config.steps:
            warnings.warn(
                f"the checkpoint {used} is at step {self.step}, past steps={self.config.steps}: "
                "there is nothing to train; raise steps to continue",
                RuntimeWarning,
                stacklevel=3,
            )
