"""The Stable Diffusion 3 / 3.5 family: diffusers' `StableDiffusion3Pipeline` folders, read and
written with diffusers' and transformers' own classes (layout: sd3_layout.py).

Everything here follows `StableDiffusion3Pipeline` (diffusers 0.42) so that what ditctl trains
on and samples is what that pipeline computes:
- prompts: both CLIPs read 77 tokens padded to max length (CLIP-G pads with "!", its tokenizer
  says so), no attention mask; their penultimate hidden states are concatenated along the
  width and zero-padded to T5's width, then T5's last hidden states (256 tokens padded to max
  length, no mask) follow along the sequence: 77 + 256 states. The pooled vector is both
  CLIPs' projected text embeddings concatenated. Without T5 its 256 states are zeros.
- the unconditional input is the encoding of "" (the pipeline's default negative prompt),
  not zeros: `unconditional_prompt`.
- latents: (z - shift_factor) * scaling_factor; the transformer is fed the timestep t*1000
  (the scheduler's sigmas times num_train_timesteps) and predicts noise - x0, which `predict`
  negates into the velocity x0 - noise of ditctl's contract (`base.flow_target`).
- time shift: the scheduler config's `shift` (3.0 for SD3/SD3.5), or its resolution-dependent
  shift when `use_dynamic_shifting` is set; the sampling grid ends where the scheduler's
  does (`SamplingDefaults.grid_end`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ExportError, ModelError
from .base import (Conditioning, DenoiserShape, LatentDist, LatentGeometry, LoraLayout,
                   SamplingDefaults)
from .fingerprint import folder_fingerprint
from .folder_io import (build_from_config, decode_scaled, encode_posterior, read_config,
                        sample_scaled, vae_shift_scale, write_pipeline_folder)
from .sd3_layout import has_t5, validate_folder
from .streaming import Convert, load_streaming

CLIP_TOKENS = 77  # both CLIPs: the pipeline pads and truncates to tokenizer.model_max_length
T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length default
CLIP_LAYER = -2  # hidden_states[-2]: the penultimate layer (the pipeline's clip_skip=None)
NUM_TRAIN_TIMESTEPS = 1000


def _no_single_file(*_: Any) -> dict:
    """SD3 has no separate single-file LoRA layout: its community tools read diffusers' own."""
    raise ExportError("SD3 LoRAs have no single-file (comfy) layout in ditctl",
                      hint="export without --format: pytorch_lora_weights.safetensors is "
                           "diffusers' layout, which `pipe.load_lora_weights` reads")


# diffusers' pipeline LoRA layout: `StableDiffusion3Pipeline.load_lora_weights(folder)` reads
# pytorch_lora_weights.safetensors with `transformer.<module>` keys (as `save_lora_weights`)
SD3_LORA_LAYOUT = LoraLayout(weights_file="pytorch_lora_weights.safetensors",
                             key_prefix="transformer.", to_single_file=_no_single_file,
                             from_single_file=_no_single_file,
                             pipeline_class="StableDiffusion3Pipeline")


@dataclass
class TextEncoders:
    """CLIP-L, CLIP-G and T5 (None when the folder runs without it), with their tokenizers."""

    tokenizers: tuple[Any, Any, Any]
    models: tuple[Any, Any, Any]
    t5_tokens: int
    joint_dim: int  # width of the T5 states (and of the zeros that stand in for them)

    def to(self, device: torch.device | str) -> "TextEncoders":
        for model in self.models:
            if model is not None:
                model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.models[0].device


class SD3Family:
    """The SD3/SD3.5 model family bound to one local StableDiffusion3Pipeline folder."""

    name = "sd3"
    # diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py: the joint attention's image
    # and text projections of every block
    lora_targets = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
    lora_target_candidates = lora_targets + (
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",  # SD3.5-medium's dual attention
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        "norm1.linear", "norm1_context.linear")
    lora_layout = SD3_LORA_LAYOUT
    embedded_guidance = None  # classifier-free guidance: an unconditional pass
    unconditional_prompt = ""  # the pipeline's default negative prompt: CFG's other branch
    licence = ("other", "Stability AI Community License")
    usage_note = ("diffusers: `StableDiffusion3Pipeline.from_pretrained(folder)`; a LoRA "
                  "export: `pipe.load_lora_weights(folder)`")

    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        self.index = validate_folder(self.path)
        self.has_t5 = has_t5(self.index, self.path)
        self._configs: dict[str, dict] = {}

    def _config(self, component: str) -> dict:
        if component not in self._configs:
            name = "scheduler_config.json" if component == "scheduler" else "config.json"
            try:
                self._configs[component] = json.loads((self.path / component / name).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ModelError(f"cannot read {self.path / component / name}: {exc}",
                                 hint="re-download or re-export the model folder") from None
        return self._configs[component]

    # --- facts --------------------------------------------------------------------------------
    @property
    def copied_components(self) -> tuple[str, ...]:
        """Everything but the transformer (T5's folders only when the base has them)."""
        t5 = ("text_encoder_3", "tokenizer_3") if self.has_t5 else ()
        return ("scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                *t5, "vae")

    @property
    def latent(self) -> LatentGeometry:
        vae_factor = 2 ** (len(self._config("vae")["block_out_channels"]) - 1)
        patch = int(self._config("transformer")["patch_size"])
        return LatentGeometry(channels=int(self._config("transformer")["in_channels"]),
                              spatial_factor=vae_factor, size_multiple=vae_factor * patch)

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        """The model cards' settings: SD3.5-medium (dual attention) 40 steps at guidance 4.5,
        SD3.5-large (qk norm) 28 at 3.5, SD3-medium 28 at 7.0; 1024 px; the grid ends at the
        scheduler's sigma_min as `FlowMatchEulerDiscreteScheduler.set_timesteps` does."""
        config = self._config("transformer")
        if config.get("dual_attention_layers"):
            steps, guidance = 40, 4.5
        elif config.get("qk_norm"):
            steps, guidance = 28, 3.5
        else:
            steps, guidance = 28, 7.0
        return SamplingDefaults(steps=steps, guidance_scale=guidance, resolution=1024,
                                grid_end=self._sigma_min())

    def _sigma_min(self) -> float:
        """The scheduler's sigma_min before the per-image shift: 1/1000, shifted once by the
        config's static shift when there is one (the scheduler's __init__ does that, and
        `set_timesteps` then runs its grid from 1 down to it and shifts again)."""
        scheduler = self._config("scheduler")
        sigma = 1.0 / int(scheduler.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS))
        if scheduler.get("use_dynamic_shifting"):
            return sigma
        shift = float(scheduler.get("shift", 1.0))
        return float(torch.tensor(shift * sigma / (1 + (shift - 1) * sigma), dtype=torch.float32))

    def resolution_shift(self, latent_h: int, latent_w: int) -> float:
        """The scheduler config's shift (3.0 for SD3/SD3.5); with `use_dynamic_shifting` the
        pipeline's mu for this image (linear in its token count) as exp(mu), or mu itself for
        the linear shift type: both are the alpha of t' = αt / (1 + (α-1)t)."""
        scheduler = self._config("scheduler")
        if not scheduler.get("use_dynamic_shifting"):
            return float(scheduler.get("shift", 1.0))
        patch = int(self._config("transformer")["patch_size"])
        tokens = (latent_h // patch) * (latent_w // patch)
        base_len = scheduler.get("base_image_seq_len", 256)
        max_len = scheduler.get("max_image_seq_len", 4096)
        base_shift = scheduler.get("base_shift", 0.5)
        max_shift = scheduler.get("max_shift", 1.16)
        slope = (max_shift - base_shift) / (max_len - base_len)
        mu = tokens * slope + base_shift - slope * base_len
        return mu if scheduler.get("time_shift_type", "exponential") == "linear" else math.exp(mu)

    # --- loading ------------------------------------------------------------------------------
    def _transformer_class(self) -> type:
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def load_denoiser(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                      convert: Convert | None = None) -> torch.nn.Module:
        """The SD3 transformer, streamed tensor by tensor into `dtype` on `device`."""
        folder = self.path / "transformer"
        with torch.device("meta"):
            model = self._skeleton(folder)
        return load_streaming(model, folder, dtype=dtype, device=device, convert=convert).eval()

    def build_denoiser_skeleton(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        with torch.device("meta"):
            return self._skeleton(self.path / "transformer").to(dtype)

    def _skeleton(self, folder: Path) -> torch.nn.Module:
        """The transformer's modules, its attention through diffusers' dispatcher (so that
        `[train] attention_backend` reaches it; see sd3_attention.py)."""
        from .sd3_attention import use_dispatched_attention

        cls = self._transformer_class()
        return use_dispatched_attention(build_from_config(
            "a " + cls.__name__, cls.from_config, self._config("transformer"), folder))

    def load_text_encoder(self, dtype: torch.dtype = torch.float32,
                          device: torch.device | str = "cpu") -> TextEncoders:
        """CLIP-L, CLIP-G and (when the folder has it) T5, with their tokenizers."""
        from transformers import (CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel,
                                  T5TokenizerFast)

        parts = [("text_encoder", "tokenizer", CLIPTextModelWithProjection, CLIPTokenizer),
                 ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection, CLIPTokenizer)]
        if self.has_t5:
            parts.append(("text_encoder_3", "tokenizer_3", T5EncoderModel, T5TokenizerFast))
        tokenizers, models = [None, None, None], [None, None, None]
        for i, (encoder, tokenizer, model_cls, tokenizer_cls) in enumerate(parts):
            try:
                tokenizers[i] = tokenizer_cls.from_pretrained(self.path / tokenizer)
                models[i] = model_cls.from_pretrained(self.path / encoder, dtype=dtype)
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot load {self.path / encoder}: {exc}",
                                 hint="re-download the model folder") from exc
            models[i].to(device).eval().requires_grad_(False)
        joint_dim = int(self._config("transformer")["joint_attention_dim"])
        return TextEncoders(tuple(tokenizers), tuple(models), T5_TOKENS, joint_dim)

    def load_vae(self, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Any:
        from diffusers import AutoencoderKL

        folder = self.path / "vae"
        with torch.device("meta"):
            vae = build_from_config("an AutoencoderKL", lambda c: AutoencoderKL.from_config(c),
                                    read_config(folder), folder)
        vae = load_streaming(vae, folder, dtype=dtype, device=device)
        return vae.eval().requires_grad_(False)

    # --- sizes --------------------------------------------------------------------------------
    def text_tokens(self) -> int:
        """77 CLIP states then 256 T5 states (zeros without T5), all attended to."""
        return CLIP_TOKENS + T5_TOKENS

    def count_tokens(self, text_encoder: TextEncoders, prompt: str) -> int:
        """The prompt's length as the encoders see it, on the scale of `text_tokens()`: 77 CLIP
        positions plus T5's tokens (CLIP itself stops at 77 in the pipeline too; T5 is what
        reads long prompts). Without T5, CLIP's tokens alone."""
        clip = len(text_encoder.tokenizers[0](prompt, truncation=False).input_ids)
        if text_encoder.tokenizers[2] is None:
            return clip
        return CLIP_TOKENS + len(text_encoder.tokenizers[2](prompt, truncation=False).input_ids)

    def image_tokens(self, latent_h: int, latent_w: int) -> int:
        """Tokens in every joint block: one per patch, plus the text states."""
        patch = int(self._config("transformer")["patch_size"])
        return (latent_h // patch) * (latent_w // patch) + self.text_tokens()

    def denoiser_shape(self) -> DenoiserShape:
        config = self._config("transformer")
        hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        # the image stream's adaLN (H -> 6H, 9H with dual attention) is a block's largest linear
        modulation = 9 if config.get("dual_attention_layers") else 6
        return DenoiserShape(hidden_size=hidden, num_heads=int(config["num_attention_heads"]),
                             depth=int(config["num_layers"]),
                             text_dim=int(config["caption_projection_dim"]),
                             patch_size=int(config["patch_size"]), mlp_ratio=4.0,
                             extra_tokens=self.text_tokens(),
                             largest_linear=hidden * max(modulation * hidden, 4 * hidden))

    # --- identities ---------------------------------------------------------------------------
    def text_encoder_identity(self) -> str:
        parts = [folder_fingerprint(self.path / c)
                 for c in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")]
        if self.has_t5:
            parts += [folder_fingerprint(self.path / c) for c in ("text_encoder_3", "tokenizer_3")]
        else:  # zeros as wide as the transformer reads
            parts.append(f"no-t5-{self._config('transformer')['joint_attention_dim']}")
        return "sd3:{}:L{}:{}+{}".format(":".join(parts), CLIP_LAYER, CLIP_TOKENS, T5_TOKENS)

    def vae_identity(self) -> str:
        return "vae:" + folder_fingerprint(self.path / "vae")

    def denoiser_identity(self) -> str:
        return "mmdit:" + folder_fingerprint(self.path / "transformer")

    # --- encoding -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, text_encoder: TextEncoders, prompts: list[str]) -> Conditioning:
        """sequence [B, 77 + 256, T5 width] and pooled [B, CLIP-L + CLIP-G projections], fp32,
        as `StableDiffusion3Pipeline.encode_prompt` computes them; no mask."""
        clip_states, pooled = [], []
        for tokenizer, model in zip(text_encoder.tokenizers[:2], text_encoder.models[:2]):
            ids = tokenizer(prompts, padding="max_length", max_length=CLIP_TOKENS,
                            truncation=True, return_tensors="pt").input_ids.to(model.device)
            out = model(ids, output_hidden_states=True)
            pooled.append(out[0].float())  # text_embeds: the projected pooled output
            clip_states.append(out.hidden_states[CLIP_LAYER].float())
        clip = torch.cat(clip_states, dim=-1)
        tokenizer, model = text_encoder.tokenizers[2], text_encoder.models[2]
        if model is None:
            t5 = torch.zeros(len(prompts), text_encoder.t5_tokens, text_encoder.joint_dim,
                             device=clip.device)
        else:
            ids = tokenizer(prompts, padding="max_length", max_length=text_encoder.t5_tokens,
                            truncation=True, add_special_tokens=True,
                            return_tensors="pt").input_ids.to(model.device)
            t5 = model(ids)[0].float().to(clip.device)
        if clip.shape[-1] > t5.shape[-1]:
            raise ModelError(f"{self.path}: the CLIP states ({clip.shape[-1]} wide) are wider "
                             f"than T5's ({t5.shape[-1]})", hint="the text encoders do not "
                             "belong together; re-download the model folder")
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5], dim=-2), pooled=torch.cat(pooled, dim=-1))

    def empty_conditioning(self, batch: int, like: Conditioning | None = None) -> Conditioning:
        """All-zero states and pooled vector of the right shapes. SD3's own unconditional
        input is the encoding of `unconditional_prompt` (""), which needs the text encoders;
        this stands in only where no encoder is at hand."""
        if like is not None:
            return like.rows([0] * batch).map(lambda _, t: torch.zeros_like(t))
        config = self._config("transformer")
        width = int(config["joint_attention_dim"])
        return Conditioning(torch.zeros(batch, self.text_tokens(), width),
                            pooled=torch.zeros(batch, int(config["pooled_projection_dim"])))

    def encode_images(self, vae: Any, images: torch.Tensor) -> LatentDist:
        return encode_posterior(vae, images)

    def sample_latents(self, dist: LatentDist, generator: torch.Generator | None) -> torch.Tensor:
        return sample_scaled(dist, generator, *self._latent_shift_scale())

    def decode_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        return decode_scaled(vae, latents, *self._latent_shift_scale())

    def _latent_shift_scale(self) -> tuple[float, float]:
        return vae_shift_scale(self._config("vae"))

    # --- the denoiser's contract (base.flow_target: the velocity x0 - noise) -----------------
    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, t: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        """The transformer at timestep t*1000 (what the pipeline passes) predicts noise - x0:
        negated."""
        timestep = t.to(torch.float32) * NUM_TRAIN_TIMESTEPS
        out = denoiser(hidden_states=noisy, encoder_hidden_states=cond.sequence,
                       pooled_projections=cond.pooled, timestep=timestep, return_dict=False)[0]
        return -out

    def parity_inputs(self, denoiser: torch.nn.Module, seed: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """Two seeded samples on a 4 x 4 patch grid, 16 text states, pooled vectors, one
        mostly-clean and one mostly-noisy timestep."""
        config = denoiser.config
        side = 4 * int(config["patch_size"])
        gen = torch.Generator().manual_seed(seed)
        latents = torch.randn(2, int(config["in_channels"]), side, side, generator=gen)
        text = torch.randn(2, 16, int(config["joint_attention_dim"]), generator=gen)
        pooled = torch.randn(2, int(config["pooled_projection_dim"]), generator=gen)
        return latents, torch.linspace(0.25, 0.75, 2), Conditioning(text, pooled=pooled)

    # --- writing the native layout ------------------------------------------------------------
    def save_pipeline(self, denoiser: torch.nn.Module, out_dir: Path, *, copy_encoders: bool = True,
                      dtype: torch.dtype = torch.bfloat16, max_shard_size: str = "5GB") -> None:
        """Write a StableDiffusion3Pipeline folder: the transformer, the base's model_index.json
        and its other components (hard-linked or copied; with copy_encoders=False, symbolic
        links to the base's folders)."""
        write_pipeline_folder(denoiser, out_dir, denoiser_folder="transformer", index=self.index,
                              base=self.path, components=self.copied_components,
                              copy_encoders=copy_encoders, dtype=dtype,
                              max_shard_size=max_shard_size)
