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
from ..models.base import Conditioning, ModelFamily

# Largest allowed max|export - reference| / max|reference|, by stored weight precision: about
# 10x the error that rounding every weight causes (measured on random DiTs of depth 2 to 40:
# fp32 ~1e-7, fp16 ~3e-4, bf16 ~2e-3, not growing with depth). A wrong or missing weight
# usually gives errors of order 1; a low-precision check cannot see a fine-tune whose whole
# effect on the output is below its tolerance (export with --dtype fp32 for a tight check).
TOLERANCES = {"fp32": 1e-4, "fp16": 3e-3, "bf16": 2e-2}


@dataclass(frozen=True)
class ParityInputs:
    latents: torch.Tensor  # [B, C, h, w]
    timesteps: torch.Tensor  # [B]
    cond: Conditioning


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


def fixed_inputs(family: ModelFamily, denoiser: torch.nn.Module, seed: int = 0) -> ParityInputs:
    """Seeded latents, timesteps and conditioning fitting the denoiser (the family's
    `parity_inputs`: small, but exercising everything its forward reads)."""
    return ParityInputs(*family.parity_inputs(denoiser, seed))


@torch.no_grad()
def predict(family: ModelFamily, denoiser: torch.nn.Module, inputs: ParityInputs) -> torch.Tensor:
    """The denoiser's fp32 output on `inputs`, on the CPU."""
    from ..engine.loading import cast_unquantized

    denoiser = cast_unquantized(denoiser, torch.float32).eval()  # quantized weights stay so
    return family.predict(denoiser, inputs.latents, inputs.timesteps, inputs.cond).float().cpu()


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


# A LoRA trained on a quantized base (fp8/int8/nf4) is merged into the full-precision base, so
# the export cannot predict exactly what the run's model (quantized base + LoRA) predicts: the
# difference is the base's quantization error. That error is measured on the same inputs at
# export time (quantized base vs full-precision base, adapters off), and the export may differ
# from the run's model by at most QUANTIZED_BASE_MARGIN times it plus the export dtype's own
# rounding tolerance. The adapters add the same thing on both sides, so the export-vs-run
# difference is about the base-alone error (tests/test_export.py sees 0.5-1.0x of it for fp8,
# int8 and nf4 on the tiny model; the errors themselves are tabled in docs/performance.md);
# 1.5x leaves room for the LoRA's interaction with the quantization error without letting a
# wrong base or a lost adapter through.
QUANTIZED_BASE_MARGIN = 1.5


@dataclass(frozen=True)
class TrainedBaseReport:
    """The export against the run's own model, whose base was stored quantized."""

    base_precision: str
    base_error: float  # max|quantized base - full base| / max|full base|, adapters off
    relative_diff: float  # max|export - run's model| / max|run's model|
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.relative_diff <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def relative_difference(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    diff = (candidate - reference).abs().max().item()
    return diff / max(reference.abs().max().item(), 1e-12) if diff == diff else float("inf")


def compare_to_trained(trained: torch.Tensor, candidate: torch.Tensor, base_error: float,
                       base_precision: str, dtype: str) -> TrainedBaseReport:
    return TrainedBaseReport(base_precision=base_precision, base_error=base_error,
                             relative_diff=relative_difference(trained, candidate),
                             tolerance=QUANTIZED_BASE_MARGIN * base_error + TOLERANCES[dtype])


def require_trained_parity(report: TrainedBaseReport, what: str) -> None:
    if not report.passed:
        raise ExportError(
            f"parity check failed: {what} differs from the run's model (base stored as "
            f"{report.base_precision}) by relative {report.relative_diff:.3g}, more than "
            f"{QUANTIZED_BASE_MARGIN:g} x the base's own quantization error "
            f"({report.base_error:.3g}) allows ({report.tolerance:.3g}); nothing was written",
            hint="please report it (--no-verify skips the check)")


def require_parity(report: ParityReport, what: str) -> None:
    if not report.passed:
        raise ExportError(
            f"parity check failed: {what} does not predict what the run's model predicts: "
            f"{report.describe()}; nothing was written",
            hint="export with --dtype fp32 to rule out rounding; if it still fails, please "
                 "report it (--no-verify skips the check)")
