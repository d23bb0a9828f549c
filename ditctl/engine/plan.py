"""`ditctl train --dry-run`: the plan of a run and an estimate of its memory, without training;
and the advice printed when training runs out of memory.

Memory estimate (bytes), per component:
  weights      trainable params x 4 (fp32 masters) + frozen params x bytes of their dtype
  gradients    trainable params x 4
  optimiser    trainable params x 8 (AdamW: two fp32 moments) or x 2 (8-bit AdamW)
  activations  per block ≈ tokens x hidden x (34 + 5 x heads x tokens / hidden) x 2 bytes under
               bf16 (x 4 in fp32), times depth; with gradient checkpointing only the block inputs
               (tokens x hidden x depth) plus one block's activations are kept.
It is an estimate from the model shape (labelled as such), not a measurement.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import Config
from .setup import DTYPES, Schedule


def activation_bytes(config: dict, tokens: int, batch: int, precision: str,
                     checkpointing: bool) -> int:
    hidden, depth, heads = config["hidden_size"], config["depth"], config["num_heads"]
    unit = 4 if precision == "no" else 2
    per_block = tokens * hidden * (34 + 5 * heads * tokens / hidden) * unit * batch
    if checkpointing:
        return int(tokens * hidden * unit * batch * depth + per_block)
    return int(per_block * depth)


def memory_estimate(denoiser: torch.nn.Module, dit_config: dict, config: Config,
                    latent_hw: tuple[int, int]) -> dict[str, int]:
    train = config.train
    trainable = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in denoiser.parameters() if not p.requires_grad)
    frozen_bytes = torch.finfo(DTYPES[train.mixed_precision]).bits // 8 \
        if config.lora.train_only_lora else 4
    patch = dit_config["patch_size"]
    tokens = (latent_hw[0] // patch) * (latent_hw[1] // patch) + 16
    batch = train.train_batch_size * train.batch_multiplicity
    return {
        "weights": trainable * 4 + frozen * frozen_bytes,
        "gradients": trainable * 4,
        "optimizer": trainable * (2 if train.use_8bit_adam else 8),
        "activations": activation_bytes(dit_config, tokens, batch, train.mixed_precision,
                                        train.gradient_checkpointing),
    }


def training_plan(schedule: Schedule, denoiser: torch.nn.Module, dit_config: dict, config: Config,
                  buckets: dict[str, int], world_size: int) -> dict[str, Any]:
    trainable = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in denoiser.parameters() if not p.requires_grad)
    largest = max(buckets, key=lambda b: int(b.split("x")[0]) * int(b.split("x")[1]))
    w, h = (int(v) for v in largest.split("x"))
    memory = memory_estimate(denoiser, dit_config, config, (h // 8, w // 8))
    train = config.train
    return {
        "processes": world_size,
        "steps_per_epoch": schedule.steps_per_epoch,
        "total_steps": schedule.total_steps,
        "epochs": round(schedule.total_steps / schedule.steps_per_epoch, 2),
        "effective_batch": schedule.step_batch * train.batch_multiplicity,
        "buckets": buckets,
        "trainable_parameters": trainable,
        "frozen_parameters": frozen,
        "memory_estimate_bytes": {**memory, "total": sum(memory.values()),
                                  "largest_bucket": largest},
    }


def memory_advice(config: Config) -> list[str]:
    """The memory-saving options this run does not use yet, as exact flags."""
    train, lora = config.train, config.lora
    advice = []
    if train.train_batch_size > 1:
        advice.append(f"--train-batch-size {max(1, train.train_batch_size // 2)} with "
                      f"--gradient-accumulation-steps {train.gradient_accumulation_steps * 2} "
                      "(same effective batch)")
    if not train.gradient_checkpointing:
        advice.append("--gradient-checkpointing")
    if train.mixed_precision == "no":
        advice.append("--mixed-precision bf16")
    if not train.use_8bit_adam:
        advice.append("--use-8bit-adam")
    if not (lora.use_lora and lora.train_only_lora):
        advice.append("--lora (train only LoRA adapters; the base is frozen)")
    elif lora.lora_rank > 16:
        advice.append(f"--lora-rank 16 (now {lora.lora_rank})")
    if not train.use_precomputed_data:
        advice.append("`ditctl precompute`, then --use-precomputed-data (no VAE/text encoder "
                      "in memory)")
    return advice
