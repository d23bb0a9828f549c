"""The training loop: one loop for every model family, full or LoRA, one or many processes.

Reads top to bottom as the algorithm: take the next global batch, keep this process's share,
noise it (counter-based randomness, see objective.py), predict, the loss (MSE, masked and
weighted as configured), accumulate, clip, step,
schedule; then log, sample, evaluate and checkpoint on their cadences. Everything a resume needs
is in the checkpoint, so k steps + resume + (N - k) steps equals N steps bit for bit.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..console import console
from ..errors import TrainingError
from ..models.base import Conditioning, LatentDist, ModelFamily
from .compile import compile_blocks
from .checkpoint import Position, load_checkpoint, restore_rng, rng_state, save_checkpoint
from .context import TrainingContext, TrainingData
from .ema import EmaWeights, ema_settings
from .monitor import Monitor
from .objective import (NoisedBatch, TimestepDensity, noised_batch, per_sample_loss, sample_seed,
                        training_guidance)
from .loader import InputLoader
from .prefetch import MicroJob, Peekable, Prefetcher, to_device
from .optim import build_optimizer, build_scheduler
from .sharding import clip_sharded_grad_norm, is_fsdp, set_gradient_sync, shard_denoiser


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    checkpoint: Path | None  # the last checkpoint this run wrote
    interrupted: bool
    skipped_steps: int


def batch_stream(data: TrainingData, position: Position) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, batch index, the step's batch of row indices) from `position` on, epoch after
    epoch (so max_steps can run past num_epochs)."""
    epoch, index = position.epoch, position.batch_index
    while True:
        batches = data.epoch_batches(epoch)
        for i in range(index, len(batches)):
            yield epoch, i, batches[i]
        epoch, index = epoch + 1, 0


@contextmanager
def stop_requests() -> Iterator[dict]:
    """SIGTERM and the first Ctrl-C ask the loop to checkpoint and stop after the current step."""
    flag = {"stop": False}
    previous = {}

    def request(signum, frame):
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True
        console.warn("stopping after this step: a checkpoint will be saved (Ctrl-C again to abort)")

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, request)
        except ValueError:  # not the main thread (e.g. in some test runners)
            pass
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_loop(ctx: TrainingContext, resume_from: Path | None = None) -> TrainResult:
    """Run training as set up in `ctx` (built by ditctl.train), from `resume_from` if given."""
    acc, family, config, data, run = ctx.accelerator, ctx.family, ctx.config, ctx.data, ctx.run
    train, schedule = config.train, ctx.schedule
    density = TimestepDensity.from_config(train)
    rank, world = acc.process_index, acc.num_processes
    sharded = is_fsdp(config)
    if sharded:  # FSDP2: shard before the optimiser exists, so it steps the local shards
        shard_denoiser(ctx.denoiser, config, acc.device)

    trainable = [p for p in ctx.denoiser.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, train)
    scheduler = build_scheduler(optimizer, train, schedule.total_steps)
    # the EMA starts as the weights training starts from; a resume replaces it with the saved one
    ema = EmaWeights(ctx.denoiser, train) if train.ema_decay > 0 else None
    position, resumed_meta = Position(0, 0, 0), {}
    if resume_from is not None and sharded:
        from .sharded_checkpoint import load_sharded_checkpoint

        resumed_meta, rng = load_sharded_checkpoint(resume_from, ctx.denoiser, optimizer,
                                                    scheduler)
        restore_rng(rng)
        position = Position(resumed_meta["step"], resumed_meta["epoch"],
                            resumed_meta["batch_index"])
    elif resume_from is not None:
        position, resumed_meta = load_checkpoint(resume_from, ctx.denoiser, optimizer, scheduler,
                                                 ema)
    if resume_from is not None:
        console.info(f"resumed from {resume_from} at step {position.step}")
    if sharded:  # already distributed by fully_shard: no DDP wrapper, the plain optimiser
        model = ctx.denoiser
    else:
        # with block streaming the model is already placed: its base blocks stay in host memory
        streamed = getattr(ctx.denoiser, "_ditctl_block_streamer", None) is not None
        model, optimizer = acc.prepare(ctx.denoiser, optimizer,
                                       device_placement=[not streamed, True])
    compiled = compile_blocks(ctx.denoiser) if train.compile else 0
    monitor = Monitor(ctx, start_step=position.step, state=resumed_meta.get("monitor"))

    unconditional = unconditional_input(
        family, data, max([train.caption_dropout] + [d.caption_dropout for d in data.datasets]))
    guidance = training_guidance(family, train)  # guidance-distilled denoisers read it
    reps = train.batch_multiplicity

    def jobs_from_position() -> Iterator[MicroJob]:
        return micro_jobs(data, position, schedule, rank, world, reps, ctx.seed)

    loader = InputLoader(data, jobs_from_position, schedule.total_steps,
                         config.data.num_workers)

    def prepare(job: MicroJob) -> NoisedBatch:
        """2. the micro-batch's rows (read by the loader's workers, encoded here where they are
        not cached), each repeated batch_multiplicity times with its own randomness, noised
        (runs in the prefetch thread; see engine/prefetch.py and engine/loader.py)."""
        rows = list(job.rows)
        batch = data.encode(loader.read(job))
        dist = LatentDist(batch.dist.mean.repeat_interleave(reps, 0),
                          batch.dist.std.repeat_interleave(reps, 0))
        mask = batch.mask.repeat_interleave(reps, 0) if batch.mask is not None else None
        repeated = [i for i in rows for _ in range(reps)]  # each dataset's dropout, loss weight
        return noised_batch(family, dist, batch.cond.repeat_interleave(reps), list(job.seeds),
                            density, data.caption_dropouts(repeated, train.caption_dropout),
                            train.resolution_shift, unconditional, guidance,
                            train.loss_weighting, mask, data.loss_weights(repeated))

    jobs = Peekable(jobs_from_position())
    device = acc.device
    consecutive_bad, skipped, last_loss, checkpoint, stopping = 0, 0, None, None, False
    # the loader forks its workers first (before the progress bar's thread) and stops them last
    with loader, stop_requests() as stop, \
            monitor.progress(schedule.total_steps, position.step) as bar, \
            Prefetcher(prepare, pin_memory=device.type == "cuda") as prefetcher:
        for step in range(position.step + 1, schedule.total_steps + 1):
            t0 = time.perf_counter()
            data_time, losses, timesteps = 0.0, [], []
            # whether every loss and the gradient were finite, kept on the device: the step
            # reads it back once, when it decides whether to step (see below)
            finite_on_device = torch.ones((), dtype=torch.bool, device=device)
            for micro in range(schedule.accumulation):
                # 1. this micro-batch (prepared while the previous one trained); start the next
                job = next(jobs)
                tick = time.perf_counter()
                noised = to_device(prefetcher.take(job), device)
                data_time += time.perf_counter() - tick
                if jobs.peek().step <= schedule.total_steps:
                    prefetcher.start(jobs.peek())
                # 3. predict and compare; gradients sync across processes on the last micro-batch
                sync = micro == schedule.accumulation - 1
                with _sync_context(acc, model, sync, sharded), acc.autocast():
                    prediction = family.predict(model, noised.noisy, noised.t, noised.cond)
                    per_sample = per_sample_loss(prediction, noised, train.masked_loss_floor)
                    loss = per_sample.mean()
                finite_on_device &= torch.isfinite(loss)
                # a non-finite loss still runs its backward (every process must take part in
                # the gradient sync); its gradients are discarded with the step below
                acc.backward(loss / schedule.accumulation)
                losses.append(per_sample.detach())
                timesteps.append(noised.t)
            # 4. clip, step, schedule — unless something was non-finite
            grad_norm = None
            if train.max_grad_norm > 0:
                grad_norm = clip_sharded_grad_norm(trainable, train.max_grad_norm) if sharded \
                    else acc.clip_grad_norm_(trainable, train.max_grad_norm)
                finite_on_device &= torch.isfinite(grad_norm)
            # the step's one host synchronisation: nothing else waits for the accelerator on a
            # step that does not log, sample, evaluate or checkpoint
            finite = bool(finite_on_device)
            if finite:
                optimizer.step()
                scheduler.step()
                if ema is not None:  # every process holds the same weights: the same EMA
                    ema.update(step)
                consecutive_bad = 0
            else:
                if acc.scaler is not None and grad_norm is not None:
                    acc.scaler.update()  # fp16: the gradients were unscaled; lower the scale
                skipped += 1
                consecutive_bad += 1
                if consecutive_bad >= train.max_nonfinite_steps:
                    raise TrainingError(
                        f"{consecutive_bad} consecutive steps had a non-finite loss or gradient "
                        f"(step {step}); nothing was saved from them",
                        hint="lower the learning rate, use --mixed-precision bf16 instead of fp16, "
                             "or resume from the last checkpoint (ditctl train --resume latest)")
            optimizer.zero_grad(set_to_none=True)
            # 5. log, sample, evaluate, checkpoint
            step_time = time.perf_counter() - t0
            compiling = bool(compiled) and step == position.step + 1
            if compiling:
                console.info(f"first step {step_time:.1f} s, including compiling {compiled} "
                             "blocks (later steps reuse the compiled code)")
            lr = scheduler.get_last_lr()[0]
            monitor.log_step(step, torch.cat(losses), torch.cat(timesteps), lr, grad_norm,
                             data_time, step_time, skipped=not finite, compiling=compiling)
            next_epoch, next_index = _next_position(data, job.epoch, job.batch_index)
            here = Position(step, next_epoch, next_index)
            # Read the request once per step and never write it back: the signal handler may set
            # it at any moment (e.g. while the gather below waits), and overwriting it with an
            # earlier reading would lose the request.
            stopping = stop["stop"]
            if world > 1:  # a signal reaches processes at different steps: stop together
                stopping = bool(acc.gather(torch.tensor([int(stopping)],
                                                        device=acc.device)).max())
            final = step == schedule.total_steps or stopping
            checkpointing = finite and (step % train.checkpoint_every == 0 or final)
            if final or checkpointing or step % train.log_every == 0:
                logged = monitor.flush()
                last_loss = logged if finite else float("nan")
                bar.advance(lr, logged)
            else:
                bar.advance(lr)
            if train.sample_every and step % train.sample_every == 0:
                monitor.sample(model, step)
            if train.eval_every and step % train.eval_every == 0:
                monitor.evaluate(model, step)
                if ema is not None and ctx.evaluator is not None:  # raw and EMA side by side
                    with ema.swapped_in():
                        monitor.evaluate(model, step, weights="ema")
            if checkpointing:
                checkpoint = _checkpoint(ctx, here, model, optimizer, scheduler, monitor, ema)
            if stopping:
                break
    monitor.close()
    return TrainResult(step if schedule.total_steps > position.step else position.step,
                       last_loss, checkpoint, stopping, skipped)


def micro_jobs(data: TrainingData, position: Position, schedule, rank: int, world: int,
               reps: int, seed: int) -> Iterator[MicroJob]:
    """Every micro-batch this process trains from `position` on, in order: step s's planned
    batch is cut into `accumulation` slices, and this process takes every world-th sample of a
    slice (j: the sample's position in the step batch, which keys its randomness)."""
    step = position.step
    for epoch, batch_index, indices in batch_stream(data, position):
        step += 1
        for micro in range(schedule.accumulation):
            first = micro * schedule.micro_batch
            mine = list(range(first + rank, first + schedule.micro_batch, world))
            yield MicroJob(step, epoch, batch_index, micro, tuple(indices[j] for j in mine),
                           tuple(sample_seed(seed, epoch, batch_index, j, r)
                                 for j in mine for r in range(reps)))


def unconditional_input(family: ModelFamily, data: TrainingData,
                        caption_dropout: float) -> Conditioning | None:
    """What a dropped caption trains on, read once: the family's unconditional prompt from the
    data source (cached by precompute, or encoded); None: the family's empty conditioning."""
    if caption_dropout <= 0 or family.unconditional_prompt is None:
        return None
    return data.source.conditioning(family.unconditional_prompt)


def _next_position(data: TrainingData, epoch: int, batch_index: int) -> tuple[int, int]:
    if batch_index + 1 < len(data.epoch_batches(epoch)):
        return epoch, batch_index + 1
    return epoch + 1, 0


def _sync_context(acc, model, sync: bool, sharded: bool):
    """Gradients are exchanged on the last micro-batch of a step only."""
    if sharded:  # FSDP reads its flag in the backward, after this block: set, not scoped
        set_gradient_sync(model, sync)
        return nullcontext()
    return nullcontext() if sync else acc.no_sync(model)


def _checkpoint(ctx: TrainingContext, position: Position, model, optimizer, scheduler,
                monitor: Monitor, ema: EmaWeights | None = None) -> Path | None:
    acc = ctx.accelerator
    acc.wait_for_everyone()
    if is_fsdp(ctx.config):  # every rank writes its own shards
        from .sharded_checkpoint import save_sharded_checkpoint

        meta = {**ctx.checkpoint_meta(), "monitor": monitor.state()}
        return save_sharded_checkpoint(ctx.run.folder, position, model, optimizer, scheduler,
                                       meta, rng_state(),
                                       keep=ctx.config.train.checkpoints_total_limit)
    folder = None
    if acc.is_main_process:
        meta = {**ctx.checkpoint_meta(), "monitor": monitor.state()}
        if ema is not None:
            meta["ema"] = ema_settings(ctx.config.train)
        folder = save_checkpoint(ctx.run.folder, position, acc.unwrap_model(model), optimizer,
                                 scheduler, meta, keep=ctx.config.train.checkpoints_total_limit,
                                 ema=ema)
    acc.wait_for_everyone()
    return folder
