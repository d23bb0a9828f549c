"""`[train] attention_backend`: one switch for every attention call of every family.

Attention goes through diffusers' attention dispatcher: diffusers' own transformers (FLUX, SD3)
already call it, and F-Lite's DiT does too (`models/flite_dit.attention`), so one context
selects the kernel everywhere. `sdpa` (the default) is torch's scaled_dot_product_attention on
the same tensors as before, bit for bit; `math` is its reference kernel (tests compare the
others against it); `flash`, `flash3`, `sage` and `xformers` need their package and a CUDA
GPU; `flex` is torch's flex attention (compiled, for GPUs: it has no backward on a CPU, so a
CPU training run would fail at its first step).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from ..errors import ConfigError

# ditctl's names -> diffusers' AttentionBackendName values
BACKENDS = {"sdpa": "native", "math": "_native_math", "flash": "flash", "flash3": "_flash_3",
            "sage": "sage", "xformers": "xformers", "flex": "flex"}
CUDA_ONLY = {"flash", "flash3", "sage", "xformers", "flex"}


def attention_context(name: str, device: torch.device | str) -> AbstractContextManager:
    """A fresh dispatcher context for `name` on `device` (each `with` needs its own), or a
    one-line error naming the fix."""
    from diffusers.models.attention_dispatch import attention_backend

    return attention_backend(check_attention_backend(name, device))


def check_attention_backend(name: str, device: torch.device | str):
    """diffusers' backend for `name`, after checking it can run on `device` (ConfigError)."""
    from diffusers.models.attention_dispatch import (AttentionBackendName,
                                                     _check_attention_backend_requirements)

    if name not in BACKENDS:
        raise ConfigError(f"[train] attention_backend = {name!r} is not known",
                          hint=f"choose one of {', '.join(BACKENDS)}")
    if name in CUDA_ONLY and torch.device(device).type != "cuda":
        raise ConfigError(f"[train] attention_backend = '{name}' runs only on a CUDA GPU "
                          f"(this process uses {torch.device(device).type})",
                          hint="use --attention-backend sdpa (the default)")
    backend = AttentionBackendName(BACKENDS[name])
    try:
        _check_attention_backend_requirements(backend)
    except (RuntimeError, ImportError) as exc:
        raise ConfigError(f"[train] attention_backend = '{name}' is not usable here: "
                          f"{str(exc).splitlines()[0]}",
                          hint="install its package, or use --attention-backend sdpa") from None
    return backend
