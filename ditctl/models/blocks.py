"""A denoiser's repeated transformer blocks, found the way diffusers and accelerate find them.

The engine shards (FSDP), streams (block offload), quantizes and plans memory per block, and
must do so for every family without naming one. diffusers' model classes already declare their
repeated block classes: `_repeated_blocks` (what regional compilation compiles) or, where that
is empty, `_no_split_modules` (what accelerate keeps on one device). F-Lite's DiT declares
`_no_split_modules = ["DiTBlock"]`, FLUX's transformer its double and single stream blocks,
SD3's its joint blocks. The blocks are the outermost modules of those classes, in registration
order, which is the order the forward pass runs them in for these models.
"""

from __future__ import annotations

import torch


def block_classes(denoiser: torch.nn.Module) -> frozenset[str]:
    """Class names the denoiser declares as its repeated blocks (empty: it declares none)."""
    for attribute in ("_repeated_blocks", "_no_split_modules"):
        names = getattr(denoiser, attribute, None)
        if names:
            return frozenset(names)
    return frozenset()


def block_names(denoiser: torch.nn.Module) -> list[str]:
    """Qualified names of the repeated blocks, in order (blocks inside blocks are not listed)."""
    classes = block_classes(denoiser)
    found: list[str] = []
    for name, module in denoiser.named_modules():
        # by the class or a base of it: FSDP2's fully_shard swaps in a subclass (FSDPDiTBlock)
        declared = any(cls.__name__ in classes for cls in type(module).__mro__)
        if declared and not any(name.startswith(outer + ".") for outer in found):
            found.append(name)
    return found


def repeated_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks themselves, in order."""
    return [denoiser.get_submodule(name) for name in block_names(denoiser)]


def in_block(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether the module or tensor `name` lies inside one of the blocks named `prefixes`."""
    return any(name.startswith(prefix + ".") for prefix in prefixes)
