"""The one sampler: Euler steps of the rectified flow with CFG or APG, shared by samples during
training, `ditctl sample` and `ditctl eval`.

From pure math to files:
  time_grid / cfg / apg / euler_sample   the math, on plain tensors (unit-tested by hand)
  sample_latents                         noise -> latents with a denoiser (what the bench times)
  generate                               prompts -> PIL images (encode, denoise, decode)
  write_samples                          PNGs with their settings as metadata, grid.png, index.json
  choose_model / run_sample              what `ditctl sample` runs: which denoiser, which folder

Reproducibility: image k of prompt p always starts from the noise of its own seed
`derive_seed(seed, p, k)`, drawn on the CPU from its own `torch.Generator`, whatever else is
generated alongside it. Batched matrix products are not batch-invariant (a 1-row GEMM takes
another kernel than a 6-row one, on CPUs and GPUs alike), so by default each image is also
denoised and decoded in forwards of its own ([negative, positive] for CFG): an image is then
bit-identical whatever `batch_size` it was generated with, e.g. the same during training and in
`ditctl sample`. `batch_invariant=False` runs one forward per batch instead (faster for small
images on a GPU; images equal up to float rounding). Nothing here touches the global RNG, so
sampling during training does not change the training run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from . import __version__
from .config import Config
from .console import console
from .engine.attention import attention_context
from .engine.inference import inference_context, param_dtype
from .engine.loading import checkpoint_weights, load_denoiser
from .engine.objective import shift_timesteps
from .errors import ConfigError, DitctlError, WorkspaceError
from .fsutil import atomic_write_bytes, atomic_write_json
from .grids import image_grid, png_bytes
from .models.base import Conditioning, ModelFamily, unconditional_text, with_guidance
from .models.registry import load_family
from .runs import SAMPLES, resolve_checkpoint, run_of_checkpoint, samples_dir
from .workspace import Workspace

Velocity = Callable[[torch.Tensor, float], torch.Tensor]
ENCODE_CHUNK = 8  # prompts per text-encoder forward


# --- seeds and the time grid ------------------------------------------------------------------

def derive_seed(base_seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image `image_index` of prompt `prompt_index`: a hash, so that no two
    (base, prompt, image) triples share noise by arithmetic accident (base 1 is not base 0
    shifted by one image)."""
    digest = hashlib.sha256(f"{base_seed}:{prompt_index}:{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**31


def initial_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise of one image, drawn on the CPU (same values on every device)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def time_grid(steps: int, shift: float, end: float | None = None) -> torch.Tensor:
    """[steps + 1] times from 1 (pure noise) down to 0: t_i = i/N for i = N..0 or, with `end`
    (a family's `SamplingDefaults.grid_end`), N times evenly from 1 down to `end` then 0;
    warped by the resolution shift as in training (float64)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if end is None:
        t = torch.arange(steps, -1, -1, dtype=torch.float64) / steps
    else:
        t = torch.cat([torch.linspace(1.0, float(end), steps, dtype=torch.float64),
                       torch.zeros(1, dtype=torch.float64)])
    return shift_timesteps(t, float(shift))


# --- guidance -----------------------------------------------------------------------------------

def cfg(v_uncond: torch.Tensor, v_cond: torch.Tensor, g: float) -> torch.Tensor:
    """Classifier-free guidance: v_u + g (v_c - v_u)."""
    return v_uncond + g * (v_cond - v_uncond)


def apg(v_uncond: torch.Tensor, v_cond: torch.Tensor, g: float, threshold: float) -> torch.Tensor:
    """Adaptive projected guidance, per sample.

    d = v_c - v_u is split into its projection on v_c and the orthogonal rest (dot products over
    all non-batch dims of each sample); the rest is scaled down where its std exceeds
    `threshold`; v = v_c + (g - 1) * orth. (Projecting over the whole batch, as one reference
    pipeline does, would let one image's guidance depend on the others.)
    """
    dims = tuple(range(1, v_cond.dim()))
    diff = v_cond - v_uncond
    dot = (diff * v_cond).sum(dims, keepdim=True)
    norm2 = (v_cond * v_cond).sum(dims, keepdim=True).clamp_min(torch.finfo(v_cond.dtype).tiny)
    orth = diff - dot / norm2 * v_cond
    std = orth.std(dim=dims, keepdim=True)
    orth = orth * (threshold / std).clamp(max=1.0)  # std 0 gives inf, clamped to 1: unchanged
    return v_cond + (g - 1) * orth


@dataclass(frozen=True)
class Guidance:
    scale: float
    use_apg: bool = False
    apg_threshold: float = 0.03


def euler_sample(velocity: Velocity, x: torch.Tensor, grid: torch.Tensor,
                 on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Integrate from grid[0] to grid[-1]: x += (t - t_next) * v(x, t) (t = 1 is noise), where v
    is the velocity x0 - noise every family's `predict` returns (`models.base.flow_target`)."""
    for i in range(len(grid) - 1):
        t, t_next = float(grid[i]), float(grid[i + 1])
        x = x + (t - t_next) * velocity(x, t)
        if on_step is not None:
            on_step()
    return x


def uses_guidance(scale: float) -> bool:
    """Whether a scale asks for guidance at all: as the families' own pipelines, a scale
    of at most 1 means the conditional prediction alone (1 gives exactly that with CFG too;
    below 1 those pipelines skip guidance rather than extrapolate away from the prompt)."""
    return scale > 1.0


def guided_velocity(family: ModelFamily, denoiser: torch.nn.Module, x: torch.Tensor, t: float,
                    cond: Conditioning, uncond: Conditioning | None,
                    guidance: Guidance) -> torch.Tensor:
    """The guided velocity at time t (fp32): one forward on [uncond; cond] (or on cond alone
    when the scale is at most 1). `uncond` None means the family's empty conditioning. A
    family with `embedded_guidance` gets the scale as an input instead (cond alone, `uncond`
    unused), as its own pipeline does."""
    dtype = param_dtype(denoiser)
    t_vec = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
    if family.embedded_guidance is not None:
        # a guidance-distilled denoiser reads the scale itself: one conditional forward
        return family.predict(denoiser, x.to(dtype), t_vec,
                              with_guidance(cond, guidance.scale).to(dtype=dtype)).float()
    if not uses_guidance(guidance.scale):
        return family.predict(denoiser, x.to(dtype), t_vec, cond.to(dtype=dtype)).float()
    if uncond is None:
        uncond = family.empty_conditioning(cond.batch_size, like=cond)
    both = family.predict(denoiser, torch.cat([x, x]).to(dtype), torch.cat([t_vec, t_vec]),
                          Conditioning.cat([uncond, cond]).to(dtype=dtype)).float()
    v_uncond, v_cond = both.chunk(2)
    if guidance.use_apg:
        return apg(v_uncond, v_cond, guidance.scale, guidance.apg_threshold)
    return cfg(v_uncond, v_cond, guidance.scale)


def sample_latents(family: ModelFamily, denoiser: torch.nn.Module, noise: torch.Tensor,
                   cond: Conditioning, uncond: Conditioning | None, *, steps: int,
                   guidance: Guidance, shift: float, batch_invariant: bool = True,
                   on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Denoise `noise` [B,C,h,w] (fp32, on the denoiser's device) to latents [B,C,h,w].

    `cond` and `uncond` (None: the family's empty conditioning) hold B samples. With
    `batch_invariant` each image runs alone (see module doc); `on_step` is called after every
    step of every forward.
    """
    grid = time_grid(steps, shift, family.sampling_defaults.grid_end)
    if uncond is None and uses_guidance(guidance.scale) and family.embedded_guidance is None:
        uncond = family.empty_conditioning(cond.batch_size, like=cond)
    with inference_context(denoiser):
        if not batch_invariant:
            return euler_sample(lambda x, t: guided_velocity(family, denoiser, x, t, cond, uncond,
                                                             guidance), noise, grid, on_step)
        out = []
        for i in range(noise.shape[0]):
            c, u = cond.rows(i), None if uncond is None else uncond.rows(i)
            out.append(euler_sample(
                lambda x, t, c=c, u=u: guided_velocity(family, denoiser, x, t, c, u, guidance),
                noise[i:i + 1], grid, on_step))
        return torch.cat(out)


# --- prompts --------------------------------------------------------------------------------------

def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DitctlError(f"prompts file {path} does not exist",
                          hint="write one prompt per line into it, or pass --prompt TEXT") from None
    except UnicodeDecodeError:
        raise DitctlError(f"prompts file {path} is not valid UTF-8",
                          hint="save it as UTF-8 text, one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DitctlError(f"prompts file {path} holds no prompts (only blank lines or # comments)",
                          hint="write one prompt per line into it, or pass --prompt TEXT")
    return prompts


def default_prompts_file(ws: Workspace, config: Config) -> Path:
    return ws.resolve(config.train.sample_prompts_file or "prompts.txt")


@dataclass
class PromptEmbeddings:
    """Encoded prompts (P samples) and the negative prompt (one; None: the empty conditioning)."""

    cond: Conditioning
    negative: Conditioning | None = None


def encode_prompts(family: ModelFamily, text_encoder: Any, prompts: Sequence[str],
                   negative_prompt: str | None = None) -> PromptEmbeddings:
    """Encode prompts (warning about any the text encoder truncates) and the negative prompt
    (unset: the family's unconditional prompt, if it has one)."""
    limit = family.text_tokens()
    for i, prompt in enumerate(prompts):
        n = family.count_tokens(text_encoder, prompt)
        if n > limit:
            console.warn(f"prompt {i + 1} has {n} tokens; the text encoder reads only the "
                         f"first {limit}, the rest is ignored: {prompt[:60]!r}...")
    chunks = [family.encode_prompts(text_encoder, list(prompts[i:i + ENCODE_CHUNK]))
              for i in range(0, len(prompts), ENCODE_CHUNK)]
    negative_text = unconditional_text(family, negative_prompt)
    negative = None if negative_text is None else family.encode_prompts(text_encoder,
                                                                        [negative_text])
    return PromptEmbeddings(Conditioning.cat(chunks).cpu(),
                            None if negative is None else negative.cpu())


# --- generate -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageJob:
    prompt_index: int
    image_index: int
    seed: int


def plan_images(n_prompts: int, images_per_prompt: int, base_seed: int) -> list[ImageJob]:
    """Every image to generate, prompt-major (all images of prompt 0 first)."""
    return [ImageJob(p, k, derive_seed(base_seed, p, k))
            for p in range(n_prompts) for k in range(images_per_prompt)]


def check_size(family: ModelFamily, width: int, height: int) -> None:
    multiple = family.latent.size_multiple
    for name, value in (("width", width), ("height", height)):
        if value < multiple or value % multiple:
            raise DitctlError(f"[sample] {name} = {value} is not a multiple of {multiple} "
                              f"(the {family.name} family's size multiple)",
                              hint=f"pass --{name} {max(multiple, round(value / multiple) * multiple)}")


def sample_size(config: Config, family: ModelFamily) -> tuple[int, int]:
    """(width, height): [sample] width/height, else the training resolution, else the family's."""
    default = config.data.resolution or family.sampling_defaults.resolution
    width, height = config.sample.width or default, config.sample.height or default
    check_size(family, width, height)
    return width, height


def resolve_settings(family: ModelFamily, settings: Any) -> Any:
    """`settings` with the keys it leaves unset (steps, guidance_scale: None) filled in from the
    family's sampling defaults; the shift stays per image size (`resolve_shift`)."""
    defaults = family.sampling_defaults
    changes = {}
    if getattr(settings, "steps", None) is None:
        changes["steps"] = defaults.steps
    if getattr(settings, "guidance_scale", None) is None:
        changes["guidance_scale"] = defaults.guidance_scale
    if not changes:
        return settings
    if dataclasses.is_dataclass(settings):
        return dataclasses.replace(settings, **changes)
    return type(settings)(**{**vars(settings), **changes})


def resolve_shift(family: ModelFamily, settings: Any, width: int, height: int) -> float:
    """[sample] shift, else the family's time shift rule for this image size."""
    shift = getattr(settings, "shift", None)
    _, latent_h, latent_w = family.latent.latent_shape(width, height)
    return float(shift) if shift else family.resolution_shift(latent_h, latent_w)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in [-1,1] -> RGB images."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy(), "RGB") for p in pixels]


def free_accelerator_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate(family: ModelFamily, denoiser: torch.nn.Module, vae: Any, prompts: Sequence[str],
             settings: Any, *, width: int, height: int, text_encoder: Any = None,
             embeddings: PromptEmbeddings | None = None, batch_invariant: bool = True,
             show_progress: bool = True) -> list[Image.Image]:
    """Images for `prompts` (prompt-major: num_images_per_prompt per prompt) as PIL images.

    `settings` is a SampleConfig (or anything with its fields). Give either a text encoder
    (prompts and the negative prompt are encoded first; with `settings.offload` it is then moved
    off the accelerator before the denoiser runs) or precomputed `embeddings`. The denoiser and
    VAE must already sit on their device.
    """
    check_size(family, width, height)
    settings = resolve_settings(family, settings)
    if embeddings is None:
        if text_encoder is None:
            raise ValueError("generate needs a text encoder or precomputed embeddings")
        embeddings = encode_prompts(family, text_encoder, prompts, settings.negative_prompt)
        if settings.offload:
            text_encoder.to("cpu")
            free_accelerator_memory()
    if embeddings.cond.batch_size != len(prompts):
        raise ValueError(f"{embeddings.cond.batch_size} embeddings for {len(prompts)} prompts")

    device = next(denoiser.parameters()).device
    guidance = Guidance(settings.guidance_scale, settings.apg, settings.apg_threshold)
    shift = resolve_shift(family, settings, width, height)
    jobs = plan_images(len(prompts), settings.num_images_per_prompt, settings.seed)
    latent_shape = family.latent.latent_shape(width, height)
    cond_all = embeddings.cond.to(device)
    negative = None if embeddings.negative is None else embeddings.negative.to(device)

    images: list[Image.Image] = []
    batches = [jobs[i:i + settings.batch_size] for i in range(0, len(jobs), settings.batch_size)]
    for number, batch in enumerate(batches, 1):
        noise = torch.stack([initial_noise(job.seed, latent_shape) for job in batch]).to(device)
        cond = cond_all.rows([job.prompt_index for job in batch])
        uncond = None if negative is None else negative.expand(len(batch))
        label = f"sampling batch {number}/{len(batches)}"
        forwards = settings.steps * (len(batch) if batch_invariant else 1)
        with (console.progress(label, forwards, unit="step")
              if show_progress else contextlib.nullcontext()) as task:
            latents = sample_latents(family, denoiser, noise, cond, uncond, steps=settings.steps,
                                     guidance=guidance, shift=shift,
                                     batch_invariant=batch_invariant,
                                     on_step=task.advance if task is not None else None)
        with torch.no_grad():
            if batch_invariant:
                pixels = torch.cat([family.decode_latents(vae, latents[i:i + 1])
                                    for i in range(len(batch))])
            else:
                pixels = family.decode_latents(vae, latents)
        images += to_pil(pixels)
    return images


# --- writing samples ----------------------------------------------------------------------------

def settings_dict(settings: Any, **resolved: Any) -> dict[str, Any]:
    """The sample settings as plain JSON values, plus resolved values (size, shift)."""
    values = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(vars(settings))
    return {**values, **resolved}


def image_file_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:03d}-s{seed}.png"


def write_samples(images: Sequence[Image.Image], prompts: Sequence[str], seeds: Sequence[int],
                  settings: dict[str, Any], out_dir: Path, *,
                  metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one PNG per image (prompt and settings in its text chunks), grid.png and index.json.

    `images` and `seeds` are prompt-major, the same number per prompt. Each file is written
    atomically and index.json last, so an index only ever lists files that are complete.
    Returns the index.
    """
    if not prompts or len(images) % len(prompts) or len(seeds) != len(images):
        raise ValueError(f"{len(images)} images, {len(seeds)} seeds for {len(prompts)} prompts")
    out_dir = Path(out_dir)
    per_prompt = len(images) // len(prompts)
    metadata = metadata or {}
    settings_json = json.dumps(settings, sort_keys=True)
    entries = []
    for i, (image, seed) in enumerate(zip(images, seeds)):
        p, k = divmod(i, per_prompt)
        name = image_file_name(p, seed)
        text = {"prompt": prompts[p], "seed": str(seed), "settings": settings_json,
                "software": f"ditctl {__version__}",
                **{key: str(value) for key, value in metadata.items()}}
        if settings.get("negative_prompt"):
            text["negative_prompt"] = settings["negative_prompt"]
        atomic_write_bytes(out_dir / name, png_bytes(image, text))
        entries.append({"file": name, "prompt_index": p, "image_index": k, "prompt": prompts[p],
                        "seed": seed})
    rows = [list(images[p * per_prompt:(p + 1) * per_prompt]) for p in range(len(prompts))]
    grid = image_grid(rows, row_labels=[f"{p}: {text}" for p, text in enumerate(prompts)])
    atomic_write_bytes(out_dir / "grid.png", png_bytes(grid, {"software": f"ditctl {__version__}"}))
    index = {"prompts": list(prompts), "images": entries, "grid": "grid.png",
             "settings": settings, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **metadata}
    atomic_write_json(out_dir / "index.json", index)
    return index


def sample_during_training(family: ModelFamily, denoiser: torch.nn.Module, vae: Any,
                           prompts: Sequence[str], out_dir: Path, settings: Any, *,
                           width: int, height: int, embeddings: PromptEmbeddings | None = None,
                           text_encoder: Any = None,
                           metadata: dict[str, Any] | None = None) -> Path:
    """Samples of a training step into `out_dir`; returns the grid's path.

    The denoiser's train/eval mode and the global RNG are left as they were.
    """
    settings = resolve_settings(family, settings)
    images = generate(family, denoiser, vae, prompts, settings, width=width, height=height,
                      text_encoder=text_encoder, embeddings=embeddings,
                      show_progress=False)  # training's own bar stays the only one
    seeds = [job.seed for job in plan_images(len(prompts), settings.num_images_per_prompt,
                                             settings.seed)]
    # the live model's weights as they are at this step, never its EMA
    resolved = dict(width=width, height=height, shift=resolve_shift(family, settings, width, height),
                    weights="raw")
    write_samples(images, prompts, seeds, settings_dict(settings, **resolved), out_dir,
                  metadata=metadata)
    return Path(out_dir) / "grid.png"


# --- which model (ditctl sample / eval) ---------------------------------------------------------

@dataclass(frozen=True)
class ModelChoice:
    """What to sample from: a family (base model folder) and optionally a checkpoint of a run."""

    family: ModelFamily
    checkpoint: Path | None
    run_dir: Path | None
    label: str  # step-000100, base, or the exported model's folder name

    def describe(self) -> str:
        if self.checkpoint is not None:
            return f"run {self.run_dir.name if self.run_dir else '?'}, checkpoint {self.checkpoint.name}"
        return f"base model {self.family.path}" if self.label == "base" else f"model {self.family.path}"


def choose_model(ws: Workspace | None, config: Config, *, run: str | None = None,
                 checkpoint: str | Path | None = None, base: bool = False,
                 model: str | Path | None = None) -> ModelChoice:
    """The model `ditctl sample` uses: --model, --base, or a checkpoint as
    `runs.resolve_checkpoint` reads --checkpoint and --run (default: the latest checkpoint of
    the latest run)."""
    given = [name for name, value in (("--model", model), ("--base", base),
                                      ("--checkpoint", checkpoint)) if value]
    if len(given) > 1 or (run and (model or base)):  # --run with --checkpoint names one
        flags = given + (["--run"] if run else [])
        raise DitctlError(f"{' and '.join(flags)} pick different models; give one of them",
                          hint="--base (no fine-tuning), --checkpoint STEP|PATH, --run NAME "
                               "(its latest checkpoint) or --model PATH (an exported pipeline)")
    if model:
        path = Path(model).expanduser()
        if ws is not None and not path.is_absolute() and not path.exists():
            path = ws.resolve(path)
        family = load_family(path)
        return ModelChoice(family, None, None, family.path.name)
    if ws is None:
        raise WorkspaceError("no workspace here, and no --model given",
                             hint="cd into a workspace, pass --workspace PATH, or sample an "
                                  "exported model with --model PATH")
    family = load_family(ws.model_path(config), config.model.family)
    if base:
        return ModelChoice(family, None, None, "base")
    found = resolve_checkpoint(ws.runs_dir(config), checkpoint, run=run)
    return ModelChoice(family, found, run_of_checkpoint(found), found.name)


def default_out_dir(ws: Workspace | None, choice: ModelChoice) -> Path:
    """runs/<run>/samples/<checkpoint>-sample for a checkpoint (training's own samples are in
    samples/<checkpoint>, made with the run's settings: never overwritten), else
    <workspace>/samples/base or <workspace>/samples/sample-<model>-<time>."""
    if choice.run_dir is not None:
        return samples_dir(choice.run_dir) / f"{choice.label}-sample"
    root = ws.root if ws is not None else Path.cwd()
    label = choice.label if choice.label == "base" else \
        f"sample-{choice.label}-{time.strftime('%Y%m%d-%H%M%S')}"
    return root / SAMPLES / label


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it (as the families' own pipelines run), fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def text_encoder_device(settings: Any, device: torch.device) -> torch.device:
    """Where prompts are encoded: [sample] text_encoder_device (cpu keeps the text encoder off
    the accelerator entirely)."""
    return torch.device("cpu") if getattr(settings, "text_encoder_device", None) == "cpu" \
        else device


def load_for_sampling(choice: ModelChoice, settings: Any, prompts: Sequence[str],
                      device: torch.device) -> tuple[torch.nn.Module, Any, PromptEmbeddings]:
    """(denoiser, vae, embeddings) on `device`, each streamed straight there in its dtype.

    The text encoder runs where [sample] text_encoder_device says (cpu: it never takes
    accelerator memory). With `settings.offload` it is loaded, used and freed before the
    denoiser is loaded; otherwise all three are resident together. A LoRA trained on a
    quantized base is sampled on that base, quantized the same way."""
    dtype = inference_dtype(device)
    text_encoder = choice.family.load_text_encoder(dtype, text_encoder_device(settings, device))
    if settings.offload:
        embeddings = encode_prompts(choice.family, text_encoder, prompts, settings.negative_prompt)
        del text_encoder
        free_accelerator_memory()
    denoiser = load_denoiser(choice.family, choice.checkpoint, lora_scale=settings.lora_scale,
                             dtype=dtype, device=device,
                             weights=getattr(settings, "weights", "auto"))
    vae = choice.family.load_vae(torch.float32, device)
    if not settings.offload:
        embeddings = encode_prompts(choice.family, text_encoder, prompts, settings.negative_prompt)
        del text_encoder
    return denoiser, vae, embeddings


def run_sample(choice: ModelChoice, config: Config, prompts: Sequence[str], out_dir: Path,
               device: torch.device | None = None) -> dict[str, Any]:
    """Generate and write the samples of `ditctl sample`; returns the index (plus "dir")."""
    device = device or inference_device()
    settings = resolve_settings(choice.family, config.sample)
    width, height = sample_size(config, choice.family)
    if choice.checkpoint is None and settings.weights == "ema":
        raise ConfigError(f"--weights ema picks a checkpoint's moving average; "
                          f"{choice.describe()} has none",
                          hint="sample a checkpoint (--run / --checkpoint), or --weights auto")
    weights = checkpoint_weights(choice.checkpoint, settings.weights)  # refused before any load
    attention = attention_context(config.train.attention_backend, device)
    denoiser, vae, embeddings = load_for_sampling(choice, settings, prompts, device)
    with attention:
        images = generate(choice.family, denoiser, vae, prompts, settings, width=width,
                          height=height, embeddings=embeddings)
    seeds = [job.seed for job in plan_images(len(prompts), settings.num_images_per_prompt,
                                             settings.seed)]
    resolved = dict(width=width, height=height,
                    shift=resolve_shift(choice.family, settings, width, height), weights=weights)
    metadata = {"model": str(choice.family.path), "source": choice.describe()}
    if choice.checkpoint is not None:
        metadata["checkpoint"] = str(choice.checkpoint)
    index = write_samples(images, prompts, seeds, settings_dict(settings, **resolved), out_dir,
                          metadata=metadata)
    return {**index, "dir": str(out_dir)}
