"""The ModelFamily protocol: everything model-specific, behind one interface.

The engine, the sampler, precompute and export only talk to a `ModelFamily`; they never ask
which model it is. A family knows how to read its folder layout, encode prompts and images,
predict with its denoiser (in the one sign of `flow_target`), and how to write its native
layout; shared code holds no family constant (latent channels, size multiples, text length,
LoRA targets, sampling defaults, licence). Adding a DiT family means writing one module that
implements this, registering it in `registry.py`, and passing tests/models/test_family_conformance.py
(docs/architecture.md, "Adding a family").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class LatentDist:
    """A VAE posterior N(mean, std²) per image, in the VAE's raw (unscaled) latent space.

    Stored by precompute instead of a sample, so that cached and on-the-fly training draw the
    same latent from the same training RNG.
    """

    mean: torch.Tensor  # [B, C, h, w]
    std: torch.Tensor  # [B, C, h, w]


@dataclass(frozen=True)
class SamplingDefaults:
    """What `ditctl sample` uses when [sample] leaves a key unset (the family's own pipeline
    defaults). The time shift rule is the family's `resolution_shift`."""

    steps: int
    guidance_scale: float
    resolution: int
    # the sampling grid before the shift: `steps` times from 1 down to `grid_end`, then 0.
    # None: down to 1/steps (t_i = i/N); diffusers' FlowMatchEulerDiscreteScheduler ends at its
    # sigma_min instead, and a family sampling as that scheduler does says so here
    grid_end: float | None = None


@dataclass(frozen=True)
class LatentGeometry:
    """How image pixels map to the denoiser's latents."""

    channels: int  # latent channels the VAE produces and the denoiser reads
    spatial_factor: int  # pixels per latent pixel, per side (the VAE's downsampling)
    size_multiple: int  # image sides must be multiples of this (spatial factor x patch size)

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """[C, h, w] of the latents of a width x height image."""
        return self.channels, height // self.spatial_factor, width // self.spatial_factor


@dataclass(frozen=True)
class DenoiserShape:
    """What the memory plan (`engine/plan.py`) needs to know about a transformer denoiser."""

    hidden_size: int
    num_heads: int
    depth: int  # transformer blocks
    text_dim: int  # width of the text states the blocks read
    patch_size: int
    mlp_ratio: float
    extra_tokens: int  # tokens besides the image patches in every block (registers, text, ...)
    largest_linear: int  # weights of the largest linear layer of a block (dequantized at once)


# The extras name of a guidance scale the denoiser reads as an input (guidance-distilled
# families, `ModelFamily.embedded_guidance`): [B] floats, set by the sampler and the objective.
GUIDANCE_EXTRA = "guidance"


@dataclass(frozen=True)
class LoraLayout:
    """How a family's ecosystem stores a LoRA of its denoiser (`ModelFamily.lora_layout`).

    The PEFT-format export writes `weights_file` with `key_prefix` before every module path
    (and before the LoraConfig keys of its metadata), next to adapter_config.json: the bare
    PEFT layout by default, diffusers' pipeline LoRA layout (`pytorch_lora_weights.safetensors`,
    `transformer.<module>...`) for families whose pipeline loads LoRAs with `load_lora_weights`.
    The single-file export uses `to_single_file(peft_state, alphas, denoiser)` and reads back
    with `from_single_file(state, denoiser) -> (LoraConfig kwargs, peft state)`; None: the
    generic comfy layout (`diffusion_model.<module>.lora_down/lora_up/alpha`).
    """

    weights_file: str = "adapter_model.safetensors"
    key_prefix: str = ""
    to_single_file: Callable[..., dict] | None = None
    from_single_file: Callable[..., tuple] | None = None
    # for the model card: the diffusers pipeline class whose `load_lora_weights` reads both
    # files (None: they load through ditctl / peft), and the single file's key naming
    pipeline_class: str | None = None
    single_file_keys: str = "`diffusion_model.<module>.lora_down/lora_up/alpha`"


def with_guidance(cond: "Conditioning", scale: float) -> "Conditioning":
    """`cond` with the guidance scale `scale` for every sample (see GUIDANCE_EXTRA)."""
    extras = dict(cond.extras)
    extras[GUIDANCE_EXTRA] = torch.full((cond.batch_size,), float(scale), dtype=torch.float32,
                                        device=cond.sequence.device)
    return Conditioning(cond.sequence, cond.mask, cond.pooled, extras)


@dataclass(frozen=True)
class Conditioning:
    """Everything a prompt gives the denoiser, as named tensors with the batch first.

    sequence  [B, L, D] text states the denoiser attends to (always present)
    mask      [B, L] bool, True where a state is real text; None: every state is attended
    pooled    [B, P] one vector per prompt (a pooled text embedding); None when unused
    extras    name -> [B, ...] anything else the family's denoiser reads per sample

    One collate (`cat`), one selection (`rows`), one device/dtype move (`to`; masks stay bool),
    one cache record (`record` / `from_record`): every consumer (precompute, cache, batch
    sources, objective, loop, sampler, evaluation) goes through these.
    """

    sequence: torch.Tensor
    mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        batch = self.sequence.shape[0]
        for name, tensor in self.named_tensors().items():
            if tensor.shape[0] != batch:
                raise ValueError(f"conditioning {name} has batch {tensor.shape[0]}, the sequence "
                                 f"{batch}")

    @property
    def batch_size(self) -> int:
        return int(self.sequence.shape[0])

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by its record name ("sequence", "mask", "pooled", "extra.<name>")."""
        out = {"sequence": self.sequence}
        if self.mask is not None:
            out["mask"] = self.mask
        if self.pooled is not None:
            out["pooled"] = self.pooled
        out.update({f"extra.{k}": v for k, v in sorted(self.extras.items())})
        return out

    @classmethod
    def from_named(cls, tensors: Mapping[str, torch.Tensor]) -> "Conditioning":
        extras = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(tensors["sequence"], tensors.get("mask"), tensors.get("pooled"), extras)

    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> "Conditioning":
        return Conditioning.from_named({k: fn(k, v) for k, v in self.named_tensors().items()})

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "Conditioning":
        """On `device`; floating tensors in `dtype` (masks and integer extras keep theirs)."""
        return self.map(lambda _, t: t.to(device=device, dtype=dtype
                                         if dtype is not None and t.is_floating_point() else None))

    def float(self) -> "Conditioning":
        return self.to(dtype=torch.float32)

    def cpu(self) -> "Conditioning":
        return self.to("cpu")

    def detach(self) -> "Conditioning":
        return self.map(lambda _, t: t.detach())

    def rows(self, index: int | slice | Sequence[int] | torch.Tensor) -> "Conditioning":
        """The samples at `index` (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self.map(lambda _, t: t[index])

    def repeat_interleave(self, repeats: int) -> "Conditioning":
        return self.map(lambda _, t: t.repeat_interleave(repeats, 0))

    def expand(self, batch: int) -> "Conditioning":
        """A batch of one repeated `batch` times (no copy)."""
        if self.batch_size != 1:
            raise ValueError(f"expand needs a batch of one, not {self.batch_size}")
        return self.map(lambda _, t: t.expand(batch, *t.shape[1:]))

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """The one collate: samples concatenated along the batch (same names in every part)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        names = [tuple(p.named_tensors()) for p in parts]
        if len(set(names)) != 1:
            raise ValueError(f"conditionings with different tensors: {sorted(set(names))}")
        return Conditioning.from_named({k: torch.cat([p.named_tensors()[k] for p in parts])
                                        for k in names[0]})

    # --- the cache record: one sample, batch dimension dropped -------------------------------
    LEGACY_SEQUENCE = "embedding"  # what caches before the Conditioning type called `sequence`

    def record(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors of a batch of one as a cache entry stores them (floats in `dtype`)."""
        if self.batch_size != 1:
            raise ValueError(f"a cache record holds one sample, not {self.batch_size}")
        return {k: (v.to(dtype) if v.is_floating_point() else v)[0].contiguous()
                for k, v in self.named_tensors().items()}

    @classmethod
    def from_record(cls, tensors: Mapping[str, torch.Tensor]) -> "Conditioning":
        """A batch of one from a cache record, floats as fp32 (older F-Lite caches named the
        sequence "embedding": they read the same)."""
        named = dict(tensors)
        if "sequence" not in named and cls.LEGACY_SEQUENCE in named:
            named["sequence"] = named.pop(cls.LEGACY_SEQUENCE)
        if "sequence" not in named:
            raise KeyError("sequence")
        return cls.from_named({k: (v.float() if v.is_floating_point() else v).unsqueeze(0)
                               for k, v in named.items()})

    @classmethod
    def record_names(cls, names: Sequence[str]) -> bool:
        """Whether `names` are the tensors of a valid record."""
        names = set(names)
        has_sequence = "sequence" in names or cls.LEGACY_SEQUENCE in names
        rest = names - {"sequence", cls.LEGACY_SEQUENCE, "mask", "pooled"}
        return has_sequence and all(n.startswith("extra.") for n in rest) and \
            not {"sequence", cls.LEGACY_SEQUENCE} <= names


# --- the rectified-flow contract ------------------------------------------------------------------
#
# Every family trains and samples the same rectified flow, so the engine and the sampler never
# ask a family which sign its network uses:
#   z_t = (1 - t)·x0 + t·noise, t in [0, 1], t = 1 pure noise;
#   `ModelFamily.predict` returns the velocity v = x0 - noise (= -dz_t/dt), in fp32 or the
#   denoiser's dtype, shaped like z_t. A network trained on the opposite sign (noise - x0, as
#   diffusers' flow-matching pipelines) negates its output inside its family's `predict`.
# The objective regresses `predict` on `flow_target`; the sampler integrates from t = 1 to 0
# with z += (t - t_next)·v.

def flow_noisy(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t)·x0 + t·noise, with t [B] broadcast over the sample dims."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What `predict` must return at any t: the velocity x0 - noise."""
    return x0 - noise


def unconditional_text(family: "ModelFamily", negative_prompt: str | None) -> str | None:
    """The text whose encoding is a run's unconditional input: the user's negative prompt, else
    the family's unconditional prompt; None means the family's `empty_conditioning`."""
    return negative_prompt if negative_prompt else family.unconditional_prompt


@runtime_checkable
class ModelFamily(Protocol):
    """One model family, bound to one model folder. Everything shared code may ask a family.

    Facts (class attributes): `name`; `lora_targets` (the default LoRA target modules, used
    when [lora] lora_target_modules is unset) and `lora_target_candidates` (every name LoRA
    may target); `sampling_defaults`; `latent` (channels, VAE factor, size multiple);
    `licence` ((Hugging Face id, display name) of the released weights, for model cards
    when the folder carries no licence) and `usage_note` (how the family's own tools load an
    export, for the model card); `embedded_guidance`: None when guidance is classifier-free
    (an unconditional pass), or, for a guidance-distilled denoiser that reads the guidance
    scale as an input (`GUIDANCE_EXTRA`), the value fed in training by default ([train]
    embedded_guidance overrides it; sampling feeds [sample] guidance_scale and runs no
    unconditional pass); `lora_layout` (how its ecosystem stores LoRA files);
    `unconditional_prompt` (see `unconditional_text`).
    """

    name: str
    path: Path
    lora_targets: tuple[str, ...]
    lora_target_candidates: tuple[str, ...]
    sampling_defaults: SamplingDefaults
    latent: LatentGeometry
    licence: tuple[str, str]
    usage_note: str
    copied_components: tuple[str, ...]  # folders an export carries over from the base unchanged
    embedded_guidance: float | None
    lora_layout: LoraLayout
    # The unconditional input (caption dropout, the guidance branch): None, the fixed tensors of
    # `empty_conditioning` (F-Lite: zeros); a string, that prompt's encoding (pipelines that
    # encode an empty negative prompt), cached by precompute like any caption.
    unconditional_prompt: str | None

    # --- loading (each component on its own, so training from a cache loads only the DiT) ---
    # Each streams its weights straight into `dtype` on `device` (never a full-precision copy);
    # `convert(name, module)` sees every denoiser module once its weights are in (quantization).
    def load_denoiser(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                      convert: Any = None) -> torch.nn.Module: ...
    def build_denoiser_skeleton(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module: ...
    def load_text_encoder(self, dtype: torch.dtype = torch.float32,
                          device: torch.device | str = "cpu") -> Any: ...
    def load_vae(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Any: ...

    # --- sizes ---
    def text_tokens(self) -> int: ...  # text states per prompt (the conditioning's L)
    def count_tokens(self, text_encoder: Any, prompt: str) -> int: ...  # before truncation
    def image_tokens(self, latent_h: int, latent_w: int) -> int: ...  # denoiser tokens per image
    def denoiser_shape(self) -> DenoiserShape: ...  # for the memory plan; reads no weights

    # --- identities: change exactly when the component's output could change ---
    def text_encoder_identity(self) -> str: ...
    def vae_identity(self) -> str: ...
    def denoiser_identity(self) -> str: ...

    # --- encoding ---
    def encode_prompts(self, text_encoder: Any, prompts: list[str]) -> Conditioning: ...  # fp32
    def empty_conditioning(self, batch: int, like: Conditioning | None = None) -> Conditioning: ...
    def encode_images(self, vae: Any, images: torch.Tensor) -> LatentDist: ...
    def sample_latents(self, dist: LatentDist, generator: torch.Generator | None) -> torch.Tensor: ...
    def decode_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor: ...

    # --- the denoiser's contract: the velocity x0 - noise (see `flow_target`) ---
    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, t: torch.Tensor,
                cond: Conditioning) -> torch.Tensor: ...
    def resolution_shift(self, latent_h: int, latent_w: int) -> float: ...  # alpha of the shift
    def parity_inputs(self, denoiser: torch.nn.Module, seed: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor, Conditioning]: ...  # small, seeded

    # --- writing the native layout ---
    def save_pipeline(self, denoiser: torch.nn.Module, out_dir: Path, *, copy_encoders: bool,
                      dtype: torch.dtype, max_shard_size: str) -> None: ...
