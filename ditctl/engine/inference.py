"""Running a denoiser for inference: its mode and gradients for the duration, its dtype.

Shared by the sampler and the validation loss, which both run the live training denoiser in the
middle of training and must hand it back as they found it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def param_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@contextlib.contextmanager
def inference_context(module: torch.nn.Module) -> Iterator[None]:
    """eval() and no_grad for the duration; a training denoiser gets its mode back."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)
