"""How step time and memory grow with resolution and with LoRA rank.

    python -m bench scaling [--quick]

LoRA training (base frozen, fp32, batch 1, the default targets) of a random F-Lite-shaped DiT
(hidden 256, depth 4, heads 4: 7.3 M parameters, small enough for 128x128 latents on a CPU;
--quick: a tiny one at smaller latents):

  resolution     latents 32², 64², 128² (256, 512, 1024 px; 272, 1040, 4112 tokens), rank 16
  rank           4, 16, 64 at 64² latents
  checkpointing  off / on at 64² latents, rank 16 (its time cost; its memory effect at batch 8
                 is in the memory benchmark)
Per point: the median step time over rounds in which every point takes one step in turn, all
in one process after a warm-up round (so load changes on a shared machine hit every point
alike), and the peak RSS above the post-import baseline of a process that trains only that
point; both also relative to the first point of the sweep, so the cost curve reads directly.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `ditctl` importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (SCALING_FLITE, TINY_FLITE, image_tokens, mb, measure_isolated,
                          offline_environment, training_flops)

FULL = dict(shape=SCALING_FLITE, latents=(32, 64, 128), ranks=(4, 16, 64), rank_latent=64,
            resolution_rank=16, rounds=3)
QUICK = dict(shape=TINY_FLITE, latents=(8, 16, 32), ranks=(4, 16, 64), rank_latent=16,
             resolution_rank=16, rounds=1)
MEMORY_STEPS = 2  # the second step allocates nothing new; the peak is reached by then

Point = tuple[int, int, bool]  # (latent side, LoRA rank, gradient checkpointing)


class PointTrainer:
    """One point's model (LoRA injected and trained as the engine does), optimiser and
    inputs; one call of `step` is one training step."""

    def __init__(self, shape, latent: int, rank: int, checkpointing: bool):
        import torch

        from bench.bench_memory import _inputs
        from bench.common import random_dit
        from ditctl.config import build_config
        from ditctl.engine.lora import add_lora, freeze_base, peft_config
        from ditctl.engine.optim import build_optimizer
        from ditctl.models.flite import FLiteFamily

        settings = build_config({"lora": {"use_lora": True, "train_only_lora": True,
                                          "lora_rank": rank, "lora_alpha": rank}})
        self.model = random_dit(shape).train()
        add_lora(self.model, peft_config(settings.lora, FLiteFamily.lora_target_candidates,
                                               FLiteFamily.lora_targets))
        freeze_base(self.model)
        if checkpointing:
            self.model.enable_gradient_checkpointing()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.trainable, settings.train)
        self.x, self.text, self.t = _inputs(shape, latent, 1)
        self.clip = torch.nn.utils.clip_grad_norm_
        self.times: list[float] = []

    def step(self) -> None:
        started = time.perf_counter()
        loss = (self.model(self.x, self.text, self.t) - self.x).pow(2).mean()
        loss.backward()
        self.clip(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - started)


def interleaved_step_times(shape, points: list[Point], rounds: int) -> dict[Point, float]:
    """Median step time per point over `rounds` round-robin rounds after one warm-up round."""
    trainers = {point: PointTrainer(shape, *point) for point in points}
    for _ in range(1 + rounds):
        for trainer in trainers.values():
            trainer.step()
    return {point: statistics.median(t.times[1:]) for point, t in trainers.items()}


def sweeps(settings: dict) -> dict[str, list[Point]]:
    """The three sweeps; they share their common point (64² latents, rank 16, no ckpt)."""
    rank0, lat0 = settings["resolution_rank"], settings["rank_latent"]
    return {
        "Resolution (LoRA rank 16)": [(lat, rank0, False) for lat in settings["latents"]],
        f"LoRA rank ({lat0}x{lat0} latents)": [(lat0, r, False) for r in settings["ranks"]],
        f"Gradient checkpointing ({lat0}x{lat0} latents, rank {rank0})":
            [(lat0, rank0, False), (lat0, rank0, True)],
    }


def memory_calls(settings: dict, points: list[Point]) -> dict[str, tuple[str, dict]]:
    shape = vars(settings["shape"])
    return {_key(point): ("bench.bench_memory:training_memory",
                          dict(shape=shape, latent=point[0], batch=1, steps=MEMORY_STEPS,
                               lora=True, use_8bit_adam=False, rank=point[1],
                               checkpointing=point[2]))
            for point in points}


def _key(point: Point) -> str:
    return f"{point[0]}-{point[1]}-{'ckpt' if point[2] else 'plain'}"


def _row(point: Point, result: dict, first: dict, shape) -> dict:
    latent, rank, ckpt = point
    peak = result["memory"]["peak_above_baseline_bytes"]
    first_peak = first["memory"]["peak_above_baseline_bytes"]
    return {"image_px": latent * 8, "latent": f"{latent}x{latent}",
            "tokens": image_tokens(latent, latent), "lora_rank": rank,
            "checkpointing": "on" if ckpt else "off",
            "trainable_params": result["trainable_params"],
            "step_s": round(result["step_s"], 4),
            "step_vs_first": round(result["step_s"] / first["step_s"], 2),
            "peak_above_baseline_mb": mb(peak), "peak_vs_first": round(peak / first_peak, 2),
            "model_gflop_6n": round(training_flops(shape, (latent, latent), 1) / 1e9, 1)}


def run(quick: bool) -> dict[str, Any]:
    offline_environment()
    settings = QUICK if quick else FULL
    shape = settings["shape"]
    plan = sweeps(settings)
    points = list(dict.fromkeys(p for sweep in plan.values() for p in sweep))
    memory = measure_isolated(memory_calls(settings, points), share_process=quick)
    step_s = interleaved_step_times(shape, points, settings["rounds"])
    result = {point: {**memory[_key(point)], "step_s": step_s[point]} for point in points}
    tables = {title: [_row(p, result[p], result[sweep[0]], shape) for p in sweep]
              for title, sweep in plan.items()}
    by_resolution = next(iter(tables.values()))
    small, large = by_resolution[0], by_resolution[-1]
    extra_k_tokens = (large["tokens"] - small["tokens"]) / 1000
    ckpt_off, ckpt_on = list(tables.values())[2]
    return {
        "tables": tables,
        "model": shape.label(),
        "memory_measured_in": "one shared process (quick)" if quick else "a process per point",
        "timing": f"median of {settings['rounds']} interleaved rounds after a warm-up round",
        "step_ms_per_extra_1k_tokens": round(
            1000 * (large["step_s"] - small["step_s"]) / extra_k_tokens, 1),
        "peak_mb_per_extra_1k_tokens": round(
            (large["peak_above_baseline_mb"] - small["peak_above_baseline_mb"])
            / extra_k_tokens, 1),
        "checkpointing_step_time_cost_pct": round(
            100 * (ckpt_on["step_s"] / ckpt_off["step_s"] - 1), 1),
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
