"""`[train] compile`: regional compilation — each repeated transformer block compiled once.

Compiling the whole denoiser traces every block separately and takes minutes for a 10B model;
the blocks are identical in structure, so compiling each block module (`nn.Module.compile`,
which keeps the module and its state-dict keys unchanged: checkpoints, LoRA export and resume
are unaffected) lets torch.compile reuse one compiled graph for all of them — diffusers calls
this regional compilation. The blocks come from `models/blocks.py`, so it works for every
family. The first step pays the compilation (reported on its own); buckets of other sizes
trigger a recompile once each (dynamic shapes after the first change).

Not combined with block streaming (`[lora] offload_base_blocks`): its hooks move weights
between devices around each block call, which a compiled block cannot contain.
"""

from __future__ import annotations

import torch

from ..config import Config
from ..errors import ConfigError
from ..models.blocks import repeated_blocks


def check_compile_config(config: Config) -> None:
    if config.train.compile and config.lora.offload_base_blocks:
        raise ConfigError("[train] compile cannot be combined with [lora] offload_base_blocks "
                          "(streaming moves each block's weights around its call)",
                          hint="drop --compile or --offload-base-blocks")


def compile_blocks(denoiser: torch.nn.Module) -> int:
    """Compile each repeated block of `denoiser` in place; returns how many."""
    blocks = repeated_blocks(denoiser)
    if not blocks:
        raise ConfigError(f"{type(denoiser).__name__} declares no repeated blocks to compile",
                          hint="drop --compile")
    for block in blocks:
        block.compile()
    return len(blocks)
