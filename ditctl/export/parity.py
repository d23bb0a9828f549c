"""Does the export predict what the run predicts? One forward pass on fixed inputs, compared.

The reference is the run's denoiser as `ditctl.engine.loading.load_denoiser` builds it (base +
LoRA, or the fine-tuned weights), in fp32. The candidate is the export reloaded from disk and run
in fp32 too, so the only difference allowed is the rounding of the stored weights to the export
dtype. The tolerance is relative to the largest output magnitude.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import ExportError
from ..models.base import ModelFamily

# Largest allowed max|export - reference| / max|reference|, by stored weight precision: about
# 10x the error that rounding every weight causes (measured on random DiTs of depth 2 to 40:
# fp32 ~1e-7, fp16 ~3e-4, bf16 ~2e-3, not growing with depth). A wrong or missing weight
# usually gives errors of order 1; a low-precision check cannot see a fine-tune whose whole
# effect on the output is below its tolerance (export with --dtype fp32 for a tight check).
TOLERANCES = {"fp32": 1e-4, "fp16": 3e-3, "bf16": 2e-2}
BATCH = 2
GRID = 4  # patches per side of the test latents: small, but a real 2-D grid for RoPE
TEXT_TOKENS = 16


@dataclass(frozen=True)
class ParityInputs:
    latents: torch.Tensor  # [B, C, h, w]
    timesteps: torch.Tensor  # [B]
    text: torch.Tensor  # [B, L, D]


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    output_scale: float  # max |reference output|
    relative_diff: float
    tolerance: float
    dtype: str

    @property
    def passed(self) -> bool:
        return self.relative_diff <= self.tolerance

    def describe(self) -> str:
        """Which number is held against which limit, e.g. `relative difference 0.0019 <= limit
        0.02 (bf16 weights; max abs diff 0.0201)`: the max abs diff alone is not the test."""
        relation = "<=" if self.passed else ">"
        return (f"relative difference {self.relative_diff:.2g} {relation} limit "
                f"{self.tolerance:g} ({self.dtype} weights; max abs diff {self.max_abs_diff:.3g})")

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def fixed_inputs(denoiser: torch.nn.Module, seed: int = 0) -> ParityInputs:
    """Seeded latents, timesteps and text states with the model's channel and text widths."""
    config = denoiser.config
    side = GRID * int(config["patch_size"])
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(BATCH, int(config["in_channels"]), side, side, generator=gen)
    text = torch.randn(BATCH, TEXT_TOKENS, int(config["cross_attn_input_size"]), generator=gen)
    timesteps = torch.linspace(0.25, 0.75, BATCH)  # one mostly-clean, one mostly-noisy sample
    return ParityInputs(latents, timesteps, text)


@torch.no_grad()
def predict(family: ModelFamily, denoiser: torch.nn.Module, inputs: ParityInputs) -> torch.Tensor:
    """The denoiser's fp32 output on `inputs`, on the CPU."""
    denoiser = denoiser.float().eval()
    return family.predict(denoiser, inputs.latents, inputs.timesteps, inputs.text).float().cpu()


def compare(reference: torch.Tensor, candidate: torch.Tensor, dtype: str) -> ParityReport:
    if candidate.shape != reference.shape:
        raise ExportError(f"the export predicts shape {tuple(candidate.shape)}, the run "
                          f"{tuple(reference.shape)}", hint="this is a bug; please report it")
    diff = (candidate - reference).abs().max().item()
    scale = reference.abs().max().item()
    # a non-finite output must fail: NaN compares false with everything, so map it to inf
    relative = diff / max(scale, 1e-12) if diff == diff else float("inf")
    return ParityReport(max_abs_diff=diff, output_scale=scale, relative_diff=relative,
                        tolerance=TOLERANCES[dtype], dtype=dtype)


def require_parity(report: ParityReport, what: str) -> None:
    if not report.passed:
        raise ExportError(
            f"parity check failed: {what} does not predict what the run's model predicts: "
            f"{report.describe()}; nothing was written",
            hint="export with --dtype fp32 to rule out rounding; if it still fails, please "
                 "report it (--no-verify skips the check)")
