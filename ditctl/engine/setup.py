"""Building what a training run needs: the accelerator, the model (with LoRA), the data source.

Kept apart from the loop so the loop reads as the training algorithm and nothing else.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config
from ..errors import ConfigError, DataError
from ..models.base import ModelFamily
from ..runs import is_complete_checkpoint, is_sharded, verify_checkpoint
from .lora import add_lora, freeze_base, load_adapter_weights, peft_config
from .compile import check_compile_config
from .sharding import check_fsdp_config
from .precision import check_base_precision, quantizer, resolve_base_precision, storage_dtype

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_accelerator(config: Config, project_dir=None):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    precision = config.train.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("[train] mixed_precision = 'fp16' needs a CUDA GPU",
                          hint="use --mixed-precision bf16 on a CPU (or 'no')")
    log_with = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"],
                "none": []}[config.train.report_to]
    if "wandb" in log_with:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(f"[train] report_to = '{config.train.report_to}' needs the wandb "
                              "package", hint="pip install 'ditctl[wandb]' (WANDB_MODE=offline "
                              "logs without an account), or --report-to tensorboard") from None
    project = ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir)) \
        if project_dir else None
    # F-Lite's first block has a parameter that never gets a gradient (its value-residual mix:
    # there is no earlier V): when base weights train, DDP must be told, or its second step fails
    trains_base = not (config.lora.use_lora and config.lora.train_only_lora)
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if trains_base else []
    return Accelerator(mixed_precision=precision, log_with=log_with or None,
                       project_config=project, cpu=not torch.cuda.is_available(),
                       kwargs_handlers=handlers)


def process_state():
    """The process layout (rank, world size) before an Accelerator exists; on a machine without
    a GPU, processes started by torchrun form a gloo group (accelerate needs `cpu=True`)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def resolve_seed(config: Config) -> int:
    """The run's seed: the configured one, else drawn once (and recorded by the caller)."""
    return config.train.seed if config.train.seed is not None else secrets.randbelow(2**31)


def build_denoiser(family: ModelFamily, config: Config,
                   device: torch.device | str = "cpu") -> torch.nn.Module:
    """The denoiser as it trains, streamed onto `device`: fp32 trainable weights (the masters),
    LoRA injected, the base frozen if asked.

    A frozen base (train_only_lora) is read straight into its [lora] base_precision (auto: the
    compute dtype), quantized layer by layer as it streams in; nothing of it is ever fp32
    unless fp32 is the compute dtype. Without a frozen base everything trains, so everything
    is fp32. `device="meta"` builds the shapes only (the --dry-run plan)."""
    lora = config.lora
    frozen_base = lora.use_lora and lora.train_only_lora
    check_training_precision(config)
    check_fsdp_config(config)
    if lora.lora_checkpoint and not lora.use_lora:
        raise ConfigError("[lora] lora_checkpoint is set but use_lora is false",
                          hint="add --use-lora (or --lora)")
    precision = base_storage(config)
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            denoiser = family.build_denoiser_skeleton(
                storage_dtype(precision, config.train.mixed_precision))
    else:
        denoiser = family.load_denoiser(storage_dtype(precision, config.train.mixed_precision),
                                        device,
                                        convert=quantizer(precision) if frozen_base else None)
    if lora.use_lora:
        add_lora(denoiser, peft_config(lora, family.lora_target_candidates, family.lora_targets))
        if lora.lora_checkpoint:
            load_adapter_weights(denoiser, _adapter_folder(lora.lora_checkpoint),
                                 family.lora_layout)
        if not lora.train_only_lora:  # the guide's --use_lora alone: base and LoRA both train
            denoiser.requires_grad_(True)  # (peft froze the base when injecting)
        else:
            freeze_base(denoiser)
    else:
        denoiser.requires_grad_(True)
    if config.train.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    return denoiser


def base_storage(config: Config) -> str:
    """What the denoiser's base weights are stored as in training: the [lora] base_precision
    (resolved) for a frozen base, else fp32 (everything trains)."""
    lora = config.lora
    if lora.use_lora and lora.train_only_lora:
        return resolve_base_precision(lora.base_precision, config.train.mixed_precision)
    return "fp32"


def check_training_precision(config: Config) -> None:
    """One-line errors for base_precision / offload combinations that cannot work."""
    lora, train = config.lora, config.train
    frozen_base = lora.use_lora and lora.train_only_lora
    check_base_precision(lora.base_precision, frozen_base=frozen_base)
    if lora.base_precision == "bf16" and train.mixed_precision == "no":
        raise ConfigError("[lora] base_precision = 'bf16' computes in bf16, but [train] "
                          "mixed_precision = 'no' computes in fp32",
                          hint="add --mixed-precision bf16 (or use --base-precision auto)")
    if lora.offload_base_blocks and not frozen_base:
        raise ConfigError("[lora] offload_base_blocks streams the frozen base: it needs a "
                          "frozen base", hint="add --lora, or drop --offload-base-blocks")
    check_compile_config(config)
    if lora.offload_base_blocks and not train.gradient_checkpointing:
        raise ConfigError("[lora] offload_base_blocks needs gradient checkpointing: without it "
                          "the backward pass keeps every block's weights on the accelerator",
                          hint="add --gradient-checkpointing")


def _adapter_folder(path: str) -> Path:
    """The folder of [lora] lora_checkpoint (a PEFT adapter folder or a ditctl checkpoint,
    whose files are then checked against its manifest like any other load)."""
    folder = Path(path)
    folder = folder if folder.is_dir() else folder.parent
    if is_complete_checkpoint(folder) and is_sharded(verify_checkpoint(folder)):
        raise ConfigError(f"[lora] lora_checkpoint {folder} is a sharded (fsdp) checkpoint",
                          hint=f"export its adapter first (`ditctl export --checkpoint {folder}`) "
                               "and start from the exported folder")
    return folder


@dataclass(frozen=True)
class Schedule:
    """How a run is cut into optimiser steps.

    One optimiser step trains on one planned batch of `step_batch` samples (train_batch_size x
    processes x accumulation steps), as `accumulation` micro-batches of `micro_batch` samples
    split across the processes. Planning the whole step's batch up front is what makes
    accumulation and multi-process training equal to one big batch.
    """

    micro_batch: int  # samples per micro-batch across all processes
    accumulation: int
    steps_per_epoch: int
    total_steps: int

    @property
    def step_batch(self) -> int:
        return self.micro_batch * self.accumulation


def step_batch_size(config: Config, world_size: int) -> int:
    train = config.train
    return train.train_batch_size * world_size * train.gradient_accumulation_steps


def plan_schedule(config: Config, steps_per_epoch: int, world_size: int) -> Schedule:
    train = config.train
    if steps_per_epoch == 0:
        raise DataError("the training set is empty", hint="run `ditctl ingest` and check its report")
    total = train.max_steps or steps_per_epoch * train.num_epochs
    return Schedule(train.train_batch_size * world_size, train.gradient_accumulation_steps,
                    steps_per_epoch, total)
