"""What training reports while it runs: progress, logs, sample images, validation loss.

Only the main process writes; the others return at once. Logs go through accelerate's trackers
(tensorboard by default, wandb when chosen), so a metric is logged once for every backend.
"""

from __future__ import annotations

import json
import resource
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..console import console
from ..runs import train_log_file
from .context import TrainingContext

TIMESTEP_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


def peak_memory_mb() -> float:
    """Peak GPU memory allocated, or this process's peak resident set size on a CPU.

    On Linux the peak comes from /proc/self/status (VmHWM): getrusage's ru_maxrss survives
    exec, so a process started by a large parent would report the parent's peak.
    """
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def truncate_log(path, step: int) -> None:
    """Drop the lines of steps after `step` from a train_log.jsonl (a run killed after its last
    checkpoint logged steps that the resume trains again), so every step appears once."""
    from ..fsutil import atomic_write_text

    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return
    kept = []
    for line in lines:
        try:
            entry_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by the kill
        if entry_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        atomic_write_text(path, "".join(kept))


@dataclass
class _PendingStep:
    """A step's record kept until `Monitor.flush` (its tensors possibly on the accelerator)."""

    step: int
    losses: torch.Tensor
    timesteps: torch.Tensor
    lr: float
    grad_norm: torch.Tensor | None
    data_time: float
    step_time: float
    skipped: bool
    compiling: bool
    peak_memory_mb: float


class _Bar:
    def __init__(self, task) -> None:
        self.task = task
        self.loss: float | None = None

    def advance(self, lr: float, loss: float | None = None) -> None:
        """One step done; `loss`: the latest step loss read back (shown until the next one)."""
        if self.task is not None:
            if loss is not None:
                self.loss = loss
            shown = "" if self.loss is None else f"loss {self.loss:.4f} "
            self.task.set_postfix(f"{shown}lr {lr:.2e}")
            self.task.advance()


class Monitor:
    def __init__(self, ctx: TrainingContext, start_step: int, state: dict | None = None) -> None:
        """`state`: what `state()` returned when the checkpoint resumed from was saved."""
        self.ctx = ctx
        self.main = ctx.accelerator.is_main_process
        # the smoothed loss carries over a resume, so its curve continues where it stopped
        self.smoothed: float | None = (state or {}).get("loss_smoothed")
        self.start_step = start_step
        self.pending: list[_PendingStep] = []
        if self.main:
            truncate_log(train_log_file(ctx.run.folder), start_step)
        if self.main and ctx.accelerator.log_with:
            ctx.accelerator.init_trackers(ctx.config.train.project_name,
                                          config=_flat_config(ctx.config.to_dict()))

    @contextmanager
    def progress(self, total: int, done: int) -> Iterator[_Bar]:
        if not self.main:
            yield _Bar(None)
            return
        with console.progress("training", total, unit="step", done=done) as task:
            yield _Bar(task)

    def log_step(self, step: int, losses: torch.Tensor, timesteps: torch.Tensor, lr: float,
                 grad_norm: torch.Tensor | None, data_time: float, step_time: float,
                 skipped: bool, compiling: bool = False) -> None:
        """Keep one step's record; `flush` writes it. `losses`, `timesteps` (this process's
        samples) and `grad_norm` may still be on the accelerator: reading them back would make
        the host wait for the step to finish, so that happens once per `[train] log_every`
        steps, for all the steps since. A step that compiled (`compiling`) reports its time as
        time/compile_step_s instead of time/step_s, so step-time statistics stay steady-state.
        Every process calls this (flush gathers every process's losses)."""
        self.pending.append(_PendingStep(step, losses.detach(), timesteps.detach(), lr,
                                         grad_norm, data_time, step_time, skipped, compiling,
                                         peak_memory_mb()))

    def flush(self) -> float | None:
        """Write the kept steps' records (one line each in train_log.jsonl and the trackers) and
        return the last step's mean loss (None: it was skipped, or nothing was kept). A
        collective with several processes: every process calls it at the same steps."""
        if not self.pending:
            return None
        pending, self.pending = self.pending, []
        acc = self.ctx.accelerator
        # one gather and one copy to the host for all the kept steps; every process holds the
        # same number of samples in a given step, so the gathered tensor is [process, values]
        local = torch.cat([torch.cat([p.losses.float(), p.timesteps.float()]) for p in pending])
        gathered = acc.gather(local.to(acc.device)).cpu()
        norms = [p.grad_norm for p in pending]
        norms = torch.stack([n.float() for n in norms if n is not None]).cpu().tolist() \
            if any(n is not None for n in norms) else []
        if not self.main:
            return None
        per_process = gathered.reshape(acc.num_processes, -1)
        offset, last_loss = 0, None
        for record in pending:
            n = len(record.losses)
            losses = per_process[:, offset:offset + n].reshape(-1)
            timesteps = per_process[:, offset + n:offset + 2 * n].reshape(-1)
            offset += 2 * n
            grad_norm = norms.pop(0) if record.grad_norm is not None else None
            last_loss = self._write(record, losses, timesteps, grad_norm)
        return last_loss

    def _write(self, record: "_PendingStep", losses: torch.Tensor, timesteps: torch.Tensor,
               grad_norm: float | None) -> float | None:
        timing = "time/compile_step_s" if record.compiling else "time/step_s"
        step_time = record.step_time
        values: dict[str, float] = {"lr": record.lr, timing: step_time,
                                    "time/data_s": record.data_time,
                                    "time/compute_s": step_time - record.data_time,
                                    "throughput/samples_per_s": len(losses) / max(step_time, 1e-9),
                                    "memory/peak_mb": record.peak_memory_mb,
                                    "train/skipped_step": float(record.skipped)}
        loss = None
        if not record.skipped:
            loss = float(losses.mean())
            self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
            values.update({"train/loss": loss, "train/loss_smoothed": self.smoothed})
            for low, high in zip(TIMESTEP_BINS, TIMESTEP_BINS[1:]):
                in_bin = (timesteps >= low) & (timesteps < high if high < 1 else timesteps <= high)
                if in_bin.any():
                    values[f"loss_by_t/{low:.2f}-{high:.2f}"] = float(losses[in_bin].mean())
        if grad_norm is not None and not record.skipped:
            values["train/grad_norm"] = grad_norm
        if self.ctx.accelerator.log_with:
            self.ctx.accelerator.log(values, step=record.step)
        with open(train_log_file(self.ctx.run.folder), "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": record.step, **values}) + "\n")
        return loss

    def state(self) -> dict:
        """What a checkpoint keeps of the monitor (JSON, in checkpoint.json): call `flush`
        first, so the smoothed loss includes every step up to the checkpoint."""
        assert not self.pending, "flush the kept steps before saving the monitor's state"
        return {"loss_smoothed": self.smoothed}

    def _runs_hooks(self) -> bool:
        """The main process samples and evaluates; with a sharded model every process runs
        the forward passes with it (each one all-gathers weights), and only the main one
        writes (the hooks know whether they write, see train_hooks)."""
        return self.main or self.ctx.config.distributed.strategy == "fsdp"

    def sample(self, model, step: int) -> None:
        if self._runs_hooks() and self.ctx.sampler is not None:
            with self.ctx.accelerator.autocast():  # a bf16-held frozen base needs autocast
                grid = self.ctx.sampler(self.ctx.accelerator.unwrap_model(model), step)
            if grid is not None and self.main:
                self._log_image("samples", grid, step)
        self.ctx.accelerator.wait_for_everyone()

    def evaluate(self, model, step: int, weights: str = "raw") -> None:
        if self._runs_hooks() and self.ctx.evaluator is not None:
            with self.ctx.accelerator.autocast():
                metrics = self.ctx.evaluator(self.ctx.accelerator.unwrap_model(model), step,
                                             weights)
            if metrics and self.main and self.ctx.accelerator.log_with:
                group = "eval" if weights == "raw" else f"eval_{weights}"
                self.ctx.accelerator.log({f"{group}/{k}": v for k, v in metrics.items()},
                                         step=step)
        self.ctx.accelerator.wait_for_everyone()

    def _log_image(self, name: str, image, step: int) -> None:
        array = np.asarray(image.convert("RGB"))
        for tracker in self.ctx.accelerator.trackers:
            tracker.log_images({name: array[None]}, step=step, dataformats="NHWC") \
                if tracker.name == "tensorboard" else tracker.log_images({name: [image]}, step=step)

    def close(self) -> None:
        if self.main and self.ctx.accelerator.log_with:
            self.ctx.accelerator.end_training()


def _flat_config(config: dict) -> dict:
    """Tracker hyper-parameters: flat keys, scalar values."""
    flat = {}
    for section, values in config.items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return flat
