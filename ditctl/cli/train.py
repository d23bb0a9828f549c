"""`ditctl train`: fine-tune the workspace's model (full or LoRA)."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from typing import Annotated, Any, Optional

import typer

from ..console import console
from ..errors import EXIT_INTERRUPTED, ConfigError
from ..oneshot import command_workspace
from ._options import JsonOption, WorkspaceOption, config_flags
from .launch import CHILD_ENV, launch_processes, worker_lifeline


@config_flags("model", "data", "train", "lora", "distributed")
def train(
    workspace: WorkspaceOption = None,
    lora: Annotated[bool, typer.Option(
        "--lora", help="Shorthand for --use-lora --train-only-lora (train only LoRA adapters).")] = False,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", help="Continue a run exactly: 'latest' (its newest checkpoint), a step (100), "
                         "a checkpoint name (step-000100), a run name or a folder.")] = None,
    run: Annotated[Optional[str], typer.Option(
        "--run", help="With --resume: the run to continue (default: [train] run_name, else the "
                      "most recently active run).", show_default=False)] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Resume even though the config or data changed.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the plan (steps, batches, parameters, memory) and exit.")] = False,
    json_output: JsonOption = False,
    *,
    overrides: dict[str, Any],
) -> None:
    if os.environ.get(CHILD_ENV):
        worker_lifeline()  # a launched process never trains on after its launcher is gone
    if resume is not None and not resume.strip():
        raise ConfigError("--resume '' names no checkpoint",
                          hint="use --resume latest, a step, a checkpoint name or a folder; "
                               "leave --resume out to start a new run")
    if lora:
        overrides = {**overrides, "lora.use_lora": True, "lora.train_only_lora": True}
    ws, overrides = command_workspace(workspace, overrides)
    config = ws.config(overrides)
    if launch_processes(ws, config, overrides, resume=resume, run=run, force=force,
                        dry_run=dry_run):
        return
    # the ML stack (seconds to import) only once the workspace and config are good
    from .. import train as training

    launched_child = bool(os.environ.get(CHILD_ENV))  # the launching parent holds the lock
    with ws.lock("train") if not (dry_run or launched_child) else nullcontext():
        outcome = training.run_training(ws, config, resume=resume, run=run, force=force,
                                        dry_run=dry_run)
    if dry_run:
        if json_output:
            console.print(json.dumps(outcome.plan, indent=2), markup=False)
        else:
            _print_plan(outcome.plan)
        return
    result, run = outcome.result, outcome.run
    if result.interrupted:
        console.print(f"stopped at step {result.steps}; checkpoint {result.checkpoint}")
        console.print(f"next: ditctl train --resume latest --run {run.name}")
        raise typer.Exit(EXIT_INTERRUPTED)  # not finished: `train && export` must not go on
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    console.print(f"[green]trained[/] {run.name}: {result.steps} steps, final loss {loss}"
                  + (f", {result.skipped_steps} non-finite steps skipped" if result.skipped_steps else ""))
    console.print(f"  checkpoint {result.checkpoint}")
    console.print("next: ditctl sample, ditctl eval, ditctl export"
                  + (" --merge-lora" if config.lora.use_lora else ""))


def _print_plan(plan: dict) -> None:
    from rich.table import Table

    table = Table(title="training plan (nothing was trained)", show_header=False)
    for key in ("processes", "steps_per_epoch", "total_steps", "epochs",
                "effective_batch", "trainable_parameters", "frozen_parameters"):
        value = plan[key]
        table.add_row(key.replace("_", " "), f"{value:,}" if isinstance(value, int) else str(value))
    table.add_row("buckets", ", ".join(f"{k}: {v}" for k, v in plan["buckets"].items()))
    for key, value in plan.get("objective", {}).items():
        table.add_row(key.replace("_", " "), value)
    for d in plan.get("datasets", ()):
        weight = f", weight {d['weight']:g}" if d["weight"] is not None else ""
        table.add_row(f"dataset {d['name']}",
                      f"{d['role']}: {d['images']} images x {d['repeats']} repeats{weight} -> "
                      f"{d['images_per_epoch']} per epoch; loss weight {d['loss_weight']:g}, "
                      f"caption dropout {d['caption_dropout']:g}")
        if d["caption_tools"]:
            shuffles = any(tool.startswith("shuffle") for tool in d["caption_tools"])
            cost = ""
            if d["captions_encoded_per_step"]:
                cost = (f"; text encoder runs ~{d['captions_encoded_per_step']:g} times per "
                        "step (shuffled captions are encoded while training, not cached)")
            elif shuffles:
                cost = "; no caption has tags to shuffle (all read from the cache)"
            table.add_row("", "captions: " + ", ".join(d["caption_tools"]) + cost)
    memory = plan["memory_estimate_bytes"]
    gib = lambda n: f"{n / 2**30:,.2f} GiB"  # noqa: E731
    table.add_row("base stored as", plan["base_precision"])
    shape = (f"largest bucket {memory['largest_bucket']}, {memory['text_tokens']} text tokens"
             + (", checkpointing" if memory["gradient_checkpointing"] else "")
             + (", base blocks streamed (2 on the device)" if memory["offload_base_blocks"]
                else ""))
    table.add_row("peak memory per process (plan)", shape)
    if plan.get("strategy") == "fsdp":
        table.add_row("  sharded", f"fsdp: weights, gradients and optimiser state / "
                                   f"{plan['shards']} processes")
    for key, label in (("base_weights", "frozen base weights"),
                       ("trainable_weights", "trainable weights (fp32)"),
                       ("gradients", "gradients (fp32)"), ("optimizer", "optimiser state"),
                       ("activations", "activations"), ("working_set", "working set"),
                       ("gathered_weights", "gathered blocks (fsdp)"),
                       ("ema_weights", "EMA of the trainable weights (fp32)"),
                       ("host_offloaded", "in host memory (cpu_offload, not in total)"),
                       ("ema_host", "EMA in host memory (ema_on_cpu, not in total)"),
                       ("total", "total")):
        if key in memory:
            table.add_row(f"  {label}", gib(memory[key]))
    toggled = "with" if not memory["gradient_checkpointing"] else "without"
    table.add_row(f"  (activations {toggled} checkpointing)",
                  gib(memory["activations_if_checkpointing_toggled"]))
    console.print(table)
