"""The F-Lite family: reading and writing the F-Lite pipeline layout with ditctl's own classes.

```
model_index.json   {"_class_name": "FLitePipeline", "dit_model": ["f_lite.model", "DiT"], ...}
dit_model/         config.json + diffusion_pytorch_model*.safetensors   -> flite_dit.DiT
text_encoder/      T5 encoder; prompts use hidden_states[-8] + final_layer_norm, always 512
                   tokens (padded/truncated to 512 whatever the tokenizer's model_max_length,
                   no attention mask: exactly what FLitePipeline feeds its DiT)
tokenizer/         T5 tokenizer
vae/               AutoencoderKL, 16 channels, 8x; latents (z - shift_factor) * scaling_factor
```
The `f_lite` package is never imported: `dit_model` is loaded with ditctl's DiT, which has the
same parameter names and math. Nothing is downloaded; only local folders are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from .base import (Conditioning, DenoiserShape, LatentDist, LatentGeometry, LoraLayout,
                   SamplingDefaults)
from .fingerprint import folder_fingerprint
from .folder_io import (build_from_config, decode_scaled, encode_posterior, read_config,
                        sample_scaled, vae_shift_scale, write_pipeline_folder)
from .flite_dit import DiT
from .flite_layout import COMPONENTS, MODEL_INDEX, validate_folder  # noqa: F401 (re-exported)
from .flite_layout import SIZE_MULTIPLE, VAE_FACTOR
from .streaming import Convert, load_streaming

TEXT_LAYER = -8  # hidden_states[-8]: output of layer 17 of 24 in T5-XXL (converges faster)
# FLitePipeline pads every prompt to 512 tokens and passes no attention mask, so the DiT attends
# to 512 states whatever the tokenizer's model_max_length says: a family fact, not a tokenizer
# setting (a shorter length draws other images from the same weights than F-Lite's pipeline).
TEXT_TOKENS = 512
MAX_TEXT_TOKENS = TEXT_TOKENS  # the name older code imported
REGISTERS = 16  # register tokens the DiT prepends to the image tokens


@dataclass
class TextEncoder:
    """The tokenizer and the T5 encoder, used together."""

    tokenizer: Any
    model: Any
    max_length: int

    def to(self, device: torch.device | str) -> "TextEncoder":
        self.model.to(device)
        return self


class FLiteFamily:
    """The F-Lite model family bound to one local model folder."""

    name = "flite"
    lora_targets = ("qkv", "q", "context_kv", "proj")
    lora_target_candidates = ("qkv", "q", "context_kv", "proj", "mlp.0", "mlp.2",
                              "adaLN_modulation.1")
    sampling_defaults = SamplingDefaults(steps=30, guidance_scale=6.0, resolution=1024)
    lora_formats = ("peft", "comfy")  # its DiT is no diffusers pipeline component
    lora_component = None
    licence = ("creativeml-openrail-m", "CreativeML Open RAIL-M")
    copied_components = ("text_encoder", "tokenizer", "vae")  # exports carry the base's own
    unconditional_prompt = None  # FLitePipeline's unconditional input is zeros, not ""
    usage_note = ("ditctl's F-Lite loader; F-Lite's own `FLitePipeline.from_pretrained` reads "
                  "the same folder")
    embedded_guidance = None  # classifier-free guidance: an unconditional pass
    lora_layout = LoraLayout()  # bare PEFT folder; single file: the generic comfy layout

    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        self.index = validate_folder(self.path)
        self._config: dict | None = None

    @property
    def latent(self) -> LatentGeometry:
        return LatentGeometry(channels=int(self.dit_config()["in_channels"]),
                              spatial_factor=VAE_FACTOR, size_multiple=SIZE_MULTIPLE)

    # --- loading ------------------------------------------------------------------------------
    def dit_config(self) -> dict:
        if self._config is None:
            self._config = read_config(self.path / "dit_model")
        return dict(self._config)

    def load_denoiser(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                      convert: Convert | None = None) -> DiT:
        """The DiT, streamed tensor by tensor into `dtype` on `device` (no full-precision copy);
        `convert(name, module)` sees every module once its weights are in (quantization)."""
        folder = self.path / "dit_model"
        with torch.device("meta"):
            dit = build_from_config("a DiT", DiT.from_config, self.dit_config(), folder)
        dit = load_streaming(dit, folder, dtype=dtype, device=device, convert=convert,
                             ignore=DiT._keys_to_ignore_on_load_unexpected)
        return dit.eval()

    def build_denoiser_skeleton(self, dtype: torch.dtype = torch.float32) -> DiT:
        """The DiT's modules and shapes on the meta device: no weights read, no memory (plans)."""
        with torch.device("meta"):
            return build_from_config("a DiT", DiT.from_config, self.dit_config(),
                                     self.path / "dit_model").to(dtype)

    def load_text_encoder(self, dtype: torch.dtype = torch.float32,
                          device: torch.device | str = "cpu") -> TextEncoder:
        from transformers import T5Config, T5EncoderModel, T5TokenizerFast

        folder = self.path / "text_encoder"
        try:
            tokenizer = T5TokenizerFast.from_pretrained(self.path / "tokenizer")
            config = T5Config.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the text encoder of {self.path}: {exc}") from exc
        if config.num_layers < -TEXT_LAYER:
            raise ModelError(f"{folder} has {config.num_layers} layers; F-Lite reads "
                             f"hidden_states[{TEXT_LAYER}], so it needs at least {-TEXT_LAYER}")
        with torch.device("meta"):
            model = build_from_config("a T5EncoderModel", T5EncoderModel, config, folder)
        # T5 ties the encoder's token embedding to `shared`; files hold one of the two
        model = load_streaming(model, folder, dtype=dtype, device=device,
                               tied={"encoder.embed_tokens.weight": "shared.weight"})
        model.config.dtype = dtype
        model.eval().requires_grad_(False)
        return TextEncoder(tokenizer, model, TEXT_TOKENS)

    def load_vae(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Any:
        from diffusers import AutoencoderKL

        folder = self.path / "vae"
        with torch.device("meta"):
            vae = build_from_config("an AutoencoderKL", lambda c: AutoencoderKL.from_config(c),
                                    read_config(folder), folder)
        vae = load_streaming(vae, folder, dtype=dtype, device=device)
        return vae.eval().requires_grad_(False)

    # --- sizes --------------------------------------------------------------------------------
    def text_tokens(self) -> int:
        """Text states per prompt (the DiT attends to all of them, padding included)."""
        return TEXT_TOKENS

    def image_tokens(self, latent_h: int, latent_w: int) -> int:
        """Tokens in every block: one per patch, plus the registers."""
        patch = int(self.dit_config()["patch_size"])
        return (latent_h // patch) * (latent_w // patch) + REGISTERS

    def denoiser_shape(self) -> DenoiserShape:
        return shape_of_config(self.dit_config())

    # --- identities ---------------------------------------------------------------------------
    def text_encoder_identity(self) -> str:
        return "t5:{}:{}:L{}".format(folder_fingerprint(self.path / "text_encoder"),
                                     folder_fingerprint(self.path / "tokenizer"), TEXT_LAYER)

    def vae_identity(self) -> str:
        return "vae:" + folder_fingerprint(self.path / "vae")

    def denoiser_identity(self) -> str:
        return "dit:" + folder_fingerprint(self.path / "dit_model")

    # --- encoding -----------------------------------------------------------------------------
    def tokenize(self, text_encoder: TextEncoder, prompts: list[str]) -> torch.Tensor:
        tokens = text_encoder.tokenizer(prompts, padding="max_length", truncation=True,
                                        max_length=text_encoder.max_length, return_tensors="pt")
        return tokens.input_ids

    def count_tokens(self, text_encoder: TextEncoder, prompt: str) -> int:
        return len(text_encoder.tokenizer(prompt, truncation=False).input_ids)

    @torch.no_grad()
    def encode_prompts(self, text_encoder: TextEncoder, prompts: list[str]) -> Conditioning:
        """Text states [B, 512, d_model]: hidden_states[-8], then the final layer norm; no mask
        and no pooled vector (the DiT has neither)."""
        model = text_encoder.model
        ids = self.tokenize(text_encoder, prompts).to(model.device)
        out = model(input_ids=ids, output_hidden_states=True)  # no attention mask, as F-Lite
        states = out.hidden_states[TEXT_LAYER]
        states = model.encoder.dropout(model.encoder.final_layer_norm(states))
        return Conditioning(states.float())

    def empty_conditioning(self, batch: int, like: Conditioning | None = None) -> Conditioning:
        """The unconditional input: all-zero text states (not the encoding of "")."""
        if like is not None:
            seq = like.sequence
            return Conditioning(torch.zeros((batch, *seq.shape[1:]), dtype=seq.dtype,
                                            device=seq.device))
        return Conditioning(torch.zeros(batch, TEXT_TOKENS,
                                        int(self.dit_config()["cross_attn_input_size"])))

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
        """F-Lite's DiT is trained on x0 - noise itself (t = 1 noise): its output, unchanged."""
        return denoiser(noisy, cond.sequence, t)

    def parity_inputs(self, denoiser: torch.nn.Module, seed: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """Two seeded samples on a 4 x 4 patch grid (a real 2-D grid for RoPE), 16 text states,
        one mostly-clean and one mostly-noisy timestep."""
        config = denoiser.config
        side = 4 * int(config["patch_size"])
        gen = torch.Generator().manual_seed(seed)
        latents = torch.randn(2, int(config["in_channels"]), side, side, generator=gen)
        text = torch.randn(2, 16, int(config["cross_attn_input_size"]), generator=gen)
        return latents, torch.linspace(0.25, 0.75, 2), Conditioning(text)

    def resolution_shift(self, latent_h: int, latent_w: int) -> float:
        """alpha = 2*sqrt(h*w/4096) in latent pixels: 1 at 256 px, 2 at 512 px, 4 at 1024 px."""
        return 2.0 * math.sqrt(latent_h * latent_w / 4096.0)

    # --- writing the native layout ------------------------------------------------------------
    def save_pipeline(self, denoiser: torch.nn.Module, out_dir: Path, *, copy_encoders: bool = True,
                      dtype: torch.dtype = torch.bfloat16, max_shard_size: str = "5GB") -> None:
        """Write an F-Lite-layout folder: model_index.json, dit_model/, and the base encoders
        (hard-linked or copied; with copy_encoders=False, symbolic links to the base's folders)."""
        index = dict(self.index)
        for key, value in MODEL_INDEX.items():
            if key != "_diffusers_version":
                index[key] = value
        write_pipeline_folder(denoiser, out_dir, denoiser_folder="dit_model", index=index,
                              base=self.path, components=self.copied_components,
                              copy_encoders=copy_encoders, dtype=dtype,
                              max_shard_size=max_shard_size)


def shape_of_config(config: dict) -> DenoiserShape:
    """The memory plan's view of a dit_model/config.json."""
    hidden = int(config["hidden_size"])
    mlp_ratio = float(config.get("mlp_ratio", 4.0))
    return DenoiserShape(hidden_size=hidden, num_heads=int(config["num_heads"]),
                         depth=int(config["depth"]), text_dim=int(config["cross_attn_input_size"]),
                         patch_size=int(config["patch_size"]), mlp_ratio=mlp_ratio,
                         extra_tokens=REGISTERS,
                         # adaLN (H -> 9H) is the largest linear of a block
                         largest_linear=hidden * max(9 * hidden, int(hidden * mlp_ratio)))
