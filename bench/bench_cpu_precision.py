"""Where a training step's time goes on a CPU, fp32 against bf16 autocast, operation by
operation: the analysis behind the advice on `--mixed-precision bf16` for CPU training.

    python -m bench cpu_precision [--quick] [--threads 1]

The small F-Lite of bench/bench_training.py (hidden 768, depth 6: 94.6 M parameters; --quick:
a tiny one) is built the way `ditctl train` builds it (`build_denoiser`) for two runs:
  full   full fine-tuning: fp32 master weights, autocast casts every weight to bf16 each step
  lora   LoRA r64 on a frozen base, stored in the compute dtype (bf16 under bf16 autocast)
and each trains profiled steps (batch 1, 256x256, after one warm-up step) in fp32 and under
bf16 autocast, the two precisions alternating step by step. torch.profiler's self CPU time per operation is summed into:
  matmul      aten::mm / addmm / bmm (the part bf16 speeds up; the bf16 matmul peak of this CPU
              against fp32 is measured in the same run)
  attention   the scaled-dot-product-attention kernels (forward and backward)
  casts       aten::copy_ / _to_copy: autocast's dtype conversions (and other copies)
  optimizer   everything inside the AdamW step (fp32 masters in both precisions)
  other       norms, RoPE, activations, the loss, autograd bookkeeping
and the bench reports each category's seconds per step, fp32 and bf16, and what bf16 saves or
costs. The precisions alternate within one run, so the ratios hold on a shared machine even
when the absolute times do not.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `ditctl` importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (SMALL_FLITE, SMALL_T5, SMALL_VAE, TINY_FLITE, TINY_T5, TINY_VAE,
                          build_bench_pipeline, matmul_peak_flops)

CATEGORIES = ("matmul", "attention", "casts", "optimizer", "other")
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
CAST_OPS = {"aten::copy_", "aten::_to_copy"}
PRECISIONS = {"fp32": "no", "bf16": "bf16"}


def category(name: str) -> str:
    if name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name in CAST_OPS:
        return "casts"
    return "other"


class Step:
    """One training step of a ditctl-built denoiser, as the engine's inner loop runs it."""

    def __init__(self, model_dir: Path, run: str, precision: str, size: int):
        from ditctl.config import build_config
        from ditctl.engine.optim import build_optimizer
        from ditctl.engine.setup import build_denoiser
        from ditctl.models.flite import FLiteFamily

        settings: dict[str, Any] = {"train": {"mixed_precision": PRECISIONS[precision]}}
        if run == "lora":
            settings["lora"] = {"use_lora": True, "train_only_lora": True, "lora_rank": 64,
                                "lora_alpha": 64}
        config = build_config(settings)
        torch.manual_seed(0)
        self.model = build_denoiser(FLiteFamily(model_dir), config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, config.train)
        self.bf16 = precision == "bf16"
        generator = torch.Generator().manual_seed(0)
        latent = size // 8
        self.x = torch.randn(1, 16, latent, latent, generator=generator)
        self.text = torch.randn(1, 64, self.model.config.cross_attn_input_size,
                                generator=generator)
        self.t = torch.rand(1, generator=generator)

    def __call__(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            prediction = self.model(self.x, self.text, self.t)
        loss = (prediction.float() - self.x).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        with torch.profiler.record_function("ditctl.optimizer_step"):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def profile_step(step: Step) -> dict[str, float]:
    """One step's seconds by category (self CPU time), and its wall time."""
    import time

    from torch.profiler import ProfilerActivity, profile

    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    seconds["wall"] = time.perf_counter() - started
    for event in prof.events():
        if event.name == "ditctl.optimizer_step":
            seconds["optimizer"] += event.cpu_time_total / 1e6
        elif not _inside_optimizer(event):
            seconds[category(event.name)] += event.self_cpu_time_total / 1e6
    seconds["total"] = sum(seconds[k] for k in CATEGORIES)
    return seconds


def _inside_optimizer(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == "ditctl.optimizer_step":
            return True
        parent = parent.cpu_parent
    return False


def run(quick: bool, steps: int | None = None) -> dict[str, Any]:
    shape, t5, vae, size = (TINY_FLITE, TINY_T5, TINY_VAE, 64) if quick else \
        (SMALL_FLITE, SMALL_T5, SMALL_VAE, 256)
    steps = steps or (1 if quick else 3)
    peaks = {name: matmul_peak_flops(name, 512 if quick else 2048) for name in PRECISIONS}
    tables: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_bench_pipeline(Path(tmp) / "model", shape, t5, vae)
        for name in ("full", "lora"):
            runs = {precision: Step(model_dir, name, precision, size) for precision in PRECISIONS}
            sums = {precision: dict.fromkeys((*CATEGORIES, "total", "wall"), 0.0)
                    for precision in PRECISIONS}
            for step in runs.values():
                step()  # warm-up: first-call allocations, AdamW's state
            for _ in range(steps):
                for precision, step in runs.items():
                    for part, value in profile_step(step).items():
                        sums[precision][part] += value / steps
            del runs
            fp32, bf16 = sums["fp32"], sums["bf16"]
            tables[f"{name} (s per step)"] = [
                {"part": part, "fp32": round(fp32[part], 3), "bf16_autocast": round(bf16[part], 3),
                 "bf16_over_fp32": round(bf16[part] / max(fp32[part], 1e-9), 2),
                 "bf16_minus_fp32_s": round(bf16[part] - fp32[part], 3)}
                for part in (*CATEGORIES, "total", "wall")]
    return {"tables": tables, "model": shape.label(), "size_px": size, "profiled_steps": steps,
            "matmul_peak_gflops_fp32": round(peaks["fp32"] / 1e9, 1),
            "matmul_peak_gflops_bf16": round(peaks["bf16"] / 1e9, 1)}
