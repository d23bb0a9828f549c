"""The FLUX.1 family (dev and schnell): diffusers' `FluxPipeline` folders, diffusers' own classes.

```
model_index.json  {"_class_name": "FluxPipeline", ...}
scheduler/        FlowMatchEulerDiscreteScheduler config: the time shift (dev: dynamic, mu
                  linear in the image token count; schnell: none)
text_encoder/     CLIPTextModel (+ tokenizer/): the pooled output at 77 tokens -> `pooled`
text_encoder_2/   T5EncoderModel (+ tokenizer_2/): the last hidden state, padded to 512 tokens
                  (dev) / 256 (schnell), no attention mask -> `sequence`
transformer/      FluxTransformer2DModel: 2x2-packed latent tokens + text tokens, RoPE ids
vae/              AutoencoderKL, 16 channels, 8x; latents (z - shift_factor) * scaling_factor
```
Everything here is what `FluxPipeline.__call__` does, so a merged export sampled by ditctl and
by diffusers draws the same images. The engine keeps [B, 16, h, w] latents; packing into
tokens and the position ids happen inside `predict`.

Guidance: FLUX.1-dev is guidance-distilled: the transformer reads the guidance scale as an
input (`guidance_embeds`) and its pipeline runs no unconditional pass. `embedded_guidance` says
so to shared code: the sampler feeds [sample] guidance_scale into the conditioning, and training
feeds [train] embedded_guidance (default 3.5, what diffusers' FLUX DreamBooth/LoRA scripts and
kohya's sd-scripts feed). schnell has no guidance input (`embedded_guidance` None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from .base import (GUIDANCE_EXTRA, Conditioning, DenoiserShape, LatentDist, LatentGeometry,
                   SamplingDefaults)
from .fingerprint import folder_fingerprint
from .folder_io import (build_from_config, decode_scaled, encode_posterior, read_config,
                        sample_scaled, vae_shift_scale, write_pipeline_folder)
from .flux_layout import SIZE_MULTIPLE, VAE_FACTOR, validate_folder
from .flux_lora import FLUX_LORA_LAYOUT
from .streaming import Convert, load_streaming

# T5 states per prompt, as FluxPipeline pads them (no mask): FLUX.1-dev was trained with 512,
# schnell with 256 (its model card: max_sequence_length=256). The variant is told apart by the
# guidance input, which only dev has.
DEV_TEXT_TOKENS = 512
SCHNELL_TEXT_TOKENS = 256
PACK = 2  # FluxPipeline packs 2x2 latent pixels into one token
# The guidance fed to FLUX.1-dev while training (diffusers' train_dreambooth_lora_flux.py and
# kohya's flux_train_network.py default); [train] embedded_guidance overrides it.
TRAINING_GUIDANCE = 3.5

DEV_LICENCE = ("other", "FLUX.1 [dev] Non-Commercial License "
               "(https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md)")
SCHNELL_LICENCE = ("apache-2.0", "Apache License 2.0")


@dataclass
class TextEncoders:
    """CLIP (pooled vector) and T5 (sequence), each with its tokenizer."""

    clip_tokenizer: Any
    clip: Any
    t5_tokenizer: Any
    t5: Any
    max_length: int  # T5 tokens per prompt

    def to(self, device: torch.device | str) -> "TextEncoders":
        self.clip.to(device)
        self.t5.to(device)
        return self


class FluxFamily:
    """The FLUX.1 model family bound to one local FluxPipeline folder."""

    name = "flux"
    # diffusers' train_dreambooth_lora_flux.py default targets (attention of both streams, and
    # both feed-forwards of the double blocks; the single blocks' q/k/v match too)
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                    "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                    "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
    # every name with a kohya/BFL counterpart (`flux_lora`): also the single blocks' MLP input
    # and the modulation layers. Not `proj_out`: it names the single blocks' output and the
    # final layer alike, whose kohya LoRA diffusers' converter loses
    lora_target_candidates = lora_targets + ("proj_mlp", "norm1.linear", "norm1_context.linear",
                                             "norm.linear")
    copied_components = ("scheduler", "text_encoder", "tokenizer", "text_encoder_2",
                         "tokenizer_2", "vae")
    usage_note = ("diffusers: `FluxPipeline.from_pretrained(folder)`; LoRA files: "
                  "`pipe.load_lora_weights(...)` (the diffusers folder or the kohya file)")
    unconditional_prompt = ""  # FluxPipeline's negative prompt is an encoded prompt, not zeros
    lora_layout = FLUX_LORA_LAYOUT

    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        self.index = validate_folder(self.path)
        self._config = read_config(self.path / "transformer")
        self._scheduler = read_config(self.path / "scheduler", "scheduler_config.json")

    # --- facts that depend on the variant ---------------------------------------------------
    @property
    def guidance_input(self) -> bool:
        """Whether the transformer reads a guidance scale (FLUX.1-dev) or not (schnell)."""
        return bool(self._config.get("guidance_embeds", False))

    @property
    def embedded_guidance(self) -> float | None:
        return TRAINING_GUIDANCE if self.guidance_input else None

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        if self.guidance_input:  # FluxPipeline's defaults, FLUX.1-dev's model card
            return SamplingDefaults(steps=28, guidance_scale=3.5, resolution=1024)
        return SamplingDefaults(steps=4, guidance_scale=0.0, resolution=1024)  # schnell's card

    @property
    def licence(self) -> tuple[str, str]:
        return DEV_LICENCE if self.guidance_input else SCHNELL_LICENCE

    @property
    def latent(self) -> LatentGeometry:
        return LatentGeometry(channels=int(self._config["in_channels"]) // (PACK * PACK),
                              spatial_factor=VAE_FACTOR, size_multiple=SIZE_MULTIPLE)

    def transformer_config(self) -> dict:
        return dict(self._config)

    # --- loading ------------------------------------------------------------------------------
    def load_denoiser(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                      convert: Convert | None = None) -> torch.nn.Module:
        folder = self.path / "transformer"
        with torch.device("meta"):
            model = self._build_transformer()
        model = load_streaming(model, folder, dtype=dtype, device=device, convert=convert)
        return model.eval()

    def build_denoiser_skeleton(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        with torch.device("meta"):
            return self._build_transformer().to(dtype)

    def _build_transformer(self) -> torch.nn.Module:
        from diffusers import FluxTransformer2DModel

        return build_from_config("a FluxTransformer2DModel", FluxTransformer2DModel.from_config,
                                 self._config, self.path / "transformer")

    def load_text_encoder(self, dtype: torch.dtype = torch.float32,
                          device: torch.device | str = "cpu") -> TextEncoders:
        from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config,
                                  T5EncoderModel, T5TokenizerFast)

        try:
            clip_tokenizer = CLIPTokenizer.from_pretrained(self.path / "tokenizer")
            t5_tokenizer = T5TokenizerFast.from_pretrained(self.path / "tokenizer_2")
            clip_config = CLIPTextConfig.from_pretrained(self.path / "text_encoder")
            t5_config = T5Config.from_pretrained(self.path / "text_encoder_2")
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the text encoders of {self.path}: {exc}") from exc
        with torch.device("meta"):
            t5 = build_from_config("a T5EncoderModel", T5EncoderModel, t5_config,
                                   self.path / "text_encoder_2")
        # CLIP-L is small (123M); its position-id buffer is not in its files, so it is loaded
        # with its own loader, straight into `dtype`
        try:
            clip = CLIPTextModel.from_pretrained(self.path / "text_encoder", config=clip_config,
                                                 torch_dtype=dtype).to(device)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load {self.path / 'text_encoder'}: {exc}") from exc
        # T5 ties the encoder's token embedding to `shared`; files hold one of the two
        t5 = load_streaming(t5, self.path / "text_encoder_2", dtype=dtype, device=device,
                            tied={"encoder.embed_tokens.weight": "shared.weight"})
        for model in (clip, t5):
            model.config.dtype = dtype
            model.eval().requires_grad_(False)
        return TextEncoders(clip_tokenizer, clip, t5_tokenizer, t5, self.text_tokens())

    def load_vae(self, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Any:
        from diffusers import AutoencoderKL

        folder = self.path / "vae"
        with torch.device("meta"):
            vae = build_from_config("an AutoencoderKL", AutoencoderKL.from_config,
                                    read_config(folder), folder)
        vae = load_streaming(vae, folder, dtype=dtype, device=device)
        return vae.eval().requires_grad_(False)

    # --- sizes --------------------------------------------------------------------------------
    def text_tokens(self) -> int:
        return DEV_TEXT_TOKENS if self.guidance_input else SCHNELL_TEXT_TOKENS

    def count_tokens(self, text_encoder: TextEncoders, prompt: str) -> int:
        """T5 tokens of the prompt (CLIP reads only its first 77 for the pooled vector)."""
        return len(text_encoder.t5_tokenizer(prompt, truncation=False).input_ids)

    def image_tokens(self, latent_h: int, latent_w: int) -> int:
        """Tokens in every block: one per 2x2 latent patch, plus the text tokens (joint
        attention: both streams attend to the concatenation)."""
        return (latent_h // PACK) * (latent_w // PACK) + self.text_tokens()

    def denoiser_shape(self) -> DenoiserShape:
        config = self._config
        hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        return DenoiserShape(
            hidden_size=hidden, num_heads=int(config["num_attention_heads"]),
            depth=int(config["num_layers"]) + int(config["num_single_layers"]),
            text_dim=int(config["joint_attention_dim"]), patch_size=PACK, mlp_ratio=4.0,
            extra_tokens=self.text_tokens(),
            # the double blocks' modulation (H -> 6H) is the largest linear of a block
            largest_linear=6 * hidden * hidden)

    # --- identities ---------------------------------------------------------------------------
    def text_encoder_identity(self) -> str:
        parts = [folder_fingerprint(self.path / c) for c in
                 ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")]
        return "clip+t5:{}:{}:{}:{}:L{}".format(*parts, self.text_tokens())

    def vae_identity(self) -> str:
        return "vae:" + folder_fingerprint(self.path / "vae")

    def denoiser_identity(self) -> str:
        return "flux:" + folder_fingerprint(self.path / "transformer")

    # --- encoding -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, text_encoder: TextEncoders, prompts: list[str]) -> Conditioning:
        """As FluxPipeline.encode_prompt: CLIP's pooled output of the prompt padded to 77 tokens,
        T5's last hidden state padded to `text_tokens()`, neither with an attention mask."""
        clip, t5 = text_encoder.clip, text_encoder.t5
        clip_ids = text_encoder.clip_tokenizer(
            prompts, padding="max_length", max_length=text_encoder.clip_tokenizer.model_max_length,
            truncation=True, return_tensors="pt").input_ids
        pooled = clip(clip_ids.to(clip.device), output_hidden_states=False).pooler_output
        t5_ids = text_encoder.t5_tokenizer(
            prompts, padding="max_length", max_length=text_encoder.max_length, truncation=True,
            return_tensors="pt").input_ids
        states = t5(t5_ids.to(t5.device), output_hidden_states=False)[0]
        return Conditioning(states.float(), pooled=pooled.float())

    def empty_conditioning(self, batch: int, like: Conditioning | None = None) -> Conditioning:
        """All-zero text states and pooled vector. Caption dropout and the sampler's negative
        branch use the encoding of `unconditional_prompt` ("") instead, as FluxPipeline."""
        if like is not None:
            return Conditioning(like.sequence.new_zeros((batch, *like.sequence.shape[1:])),
                                pooled=like.pooled.new_zeros((batch, *like.pooled.shape[1:])))
        return Conditioning(torch.zeros(batch, self.text_tokens(),
                                        int(self._config["joint_attention_dim"])),
                            pooled=torch.zeros(batch, int(self._config["pooled_projection_dim"])))

    def encode_images(self, vae: Any, images: torch.Tensor) -> LatentDist:
        return encode_posterior(vae, images)

    def sample_latents(self, dist: LatentDist, generator: torch.Generator | None) -> torch.Tensor:
        return sample_scaled(dist, generator, *self._latent_shift_scale())

    def decode_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        return decode_scaled(vae, latents, *self._latent_shift_scale())

    def _latent_shift_scale(self) -> tuple[float, float]:
        if not hasattr(self, "_shift_scale"):
            self._shift_scale = vae_shift_scale(read_config(self.path / "vae"))
        return self._shift_scale

    # --- the denoiser's contract (base.flow_target: the velocity x0 - noise) -----------------
    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, t: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        """FLUX predicts noise - x0 on packed tokens: pack, run, unpack, negate. The timestep
        goes in as t in [0, 1] (FluxPipeline passes sigma·1000/1000; the transformer scales by
        1000 itself), the guidance as the scale (extras["guidance"], else the training
        default)."""
        batch, channels, height, width = noisy.shape
        tokens = pack_latents(noisy)
        img_ids = latent_image_ids(height // PACK, width // PACK, noisy.device, tokens.dtype)
        txt_ids = torch.zeros(cond.sequence.shape[1], 3, device=noisy.device, dtype=tokens.dtype)
        guidance = None
        if self.guidance_input:
            guidance = cond.extras.get(GUIDANCE_EXTRA)
            if guidance is None:
                guidance = torch.full((batch,), TRAINING_GUIDANCE, device=noisy.device)
            guidance = guidance.to(device=noisy.device, dtype=torch.float32)
        out = denoiser(hidden_states=tokens, timestep=t.to(tokens.dtype), guidance=guidance,
                       pooled_projections=cond.pooled, encoder_hidden_states=cond.sequence,
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return -unpack_latents(out, height, width)

    def parity_inputs(self, denoiser: torch.nn.Module, seed: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """Two seeded samples on a 4 x 4 token grid, 16 text states, a pooled vector and (dev)
        two guidance values; one mostly-clean and one mostly-noisy timestep."""
        gen = torch.Generator().manual_seed(seed)
        latents = torch.randn(2, self.latent.channels, 4 * PACK, 4 * PACK, generator=gen)
        text = torch.randn(2, 16, int(self._config["joint_attention_dim"]), generator=gen)
        pooled = torch.randn(2, int(self._config["pooled_projection_dim"]), generator=gen)
        extras = {GUIDANCE_EXTRA: torch.tensor([2.0, 4.0])} if self.guidance_input else {}
        return latents, torch.linspace(0.25, 0.75, 2), Conditioning(text, pooled=pooled,
                                                                    extras=extras)

    def resolution_shift(self, latent_h: int, latent_w: int) -> float:
        """The alpha of FluxPipeline's time shift, from the folder's scheduler config: with
        `use_dynamic_shifting` (dev) alpha = exp(mu), mu linear in the image token count from
        base_shift at base_image_seq_len to max_shift at max_image_seq_len (0.5 at 256 tokens,
        1.15 at 4096); otherwise the static `shift` (schnell: 1, none)."""
        config = self._scheduler
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        tokens = (latent_h // PACK) * (latent_w // PACK)
        base_len = float(config.get("base_image_seq_len", 256))
        max_len = float(config.get("max_image_seq_len", 4096))
        base_shift = float(config.get("base_shift", 0.5))
        max_shift = float(config.get("max_shift", 1.15))
        slope = (max_shift - base_shift) / (max_len - base_len)
        return math.exp(tokens * slope + base_shift - slope * base_len)

    # --- writing the native layout ------------------------------------------------------------
    def save_pipeline(self, denoiser: torch.nn.Module, out_dir: Path, *, copy_encoders: bool = True,
                      dtype: torch.dtype = torch.bfloat16, max_shard_size: str = "5GB") -> None:
        """Write a FluxPipeline folder: model_index.json, transformer/, and the base's other
        components (hard-linked or copied; with copy_encoders=False, symbolic links)."""
        write_pipeline_folder(denoiser, out_dir, denoiser_folder="transformer", index=self.index,
                              base=self.path, components=self.copied_components,
                              copy_encoders=copy_encoders, dtype=dtype,
                              max_shard_size=max_shard_size)


# --- packing, as FluxPipeline._pack_latents / _unpack_latents / _prepare_latent_image_ids ------

def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: each 2x2 latent patch one token (channel-major)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for a [height, width] latent."""
    b, _, dim = tokens.shape
    x = tokens.view(b, height // PACK, width // PACK, dim // (PACK * PACK), PACK, PACK)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, dim // (PACK * PACK), height, width)


def latent_image_ids(rows: int, cols: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """[rows·cols, 3] RoPE position ids of the packed tokens: (0, row, col)."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)
