"""Train the tiny F-Lite-layout base model that ships in ditctl/assets/tiny-flite/.

    python bench/train_tiny_base.py [--out DIR] [--work DIR] [--seed N] [--threads N] [--quick]

Reproducible from the seed, on a CPU (about 35 minutes on 2 cores). Four stages:

1. VAE: a 16-channel 8x diffusers `AutoencoderKL` (the F-Lite latent layout), trained by a plain
   PyTorch loop to reconstruct procedural scenes (`ditctl.demo.scenes`, every colour: the VAE
   is the pipeline's generic image codec, like a real model's). Its `shift_factor` and
   `scaling_factor` are then set from the latents of the DiT's training images, so that the
   scaled latents have mean 0 and std 1.
2. Text encoder: an 8-layer T5 with random weights and the locally built tokenizer of
   `ditctl.models.tiny` (random features still tell the words apart; nothing is downloaded).
3. DiT: `ditctl.models.flite_dit.DiT` (patch size 1, see DIT_SHAPE) with F-Lite's own init
   (zero-initialised output and modulation), fully fine-tuned by ditctl's engine itself: a
   workspace, `run_ingest`, `run_precompute`, then `run_training` from the cache. Its data leave out the held-out
   concept (`HELD_OUT`, green), which is what `ditctl init --example` later teaches a LoRA.
4. Ship and measure: the DiT is stored in fp16 (loaders cast to fp32), the folder is written
   atomically to --out, and the shipped files are scored with `ditctl.demo.concept_check`
   (fixed prompts and seeds). The numbers go to --out/TRAINING.md and bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench.common` as a script too

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import append_results, machine_stamp, offline_environment, results_block  # noqa: E402
from ditctl.scaffold import TINY_MODEL_SETTINGS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "ditctl" / "assets" / "tiny-flite"
RESULTS_FILE = REPO / "bench" / "RESULTS.md"

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 32, 64), layers_per_block=1,
    # One normalisation group: GroupNorm removes each group's mean, and with one channel per
    # group the flat colours of these scenes (a per-channel mean) would be normalised away.
    norm_num_groups=1, mid_block_add_attention=False, sample_size=64)
T5_DIM = 64
# Patch size 1: 64 tokens for a 64x64 image (8x8 latent pixels, each 8x8 image pixels). With
# F-Lite's patch 2 there are only 16 tokens, and a tiny model draws blobs rather than shapes.
DIT_SHAPE = dict(hidden=128, depth=4, heads=4, patch_size=1)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides the weights (recorded with the results)."""

    seed: int = 0
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5
    vae_images: int = 4000
    scenes: int = 6000
    # Square only: the model is measured (and the demo samples) at 64x64, and every training
    # step at that size goes to what is measured. Other sizes still work through the buckets.
    scene_sizes: tuple[tuple[int, int], ...] = ((64, 64),)
    dit_steps: int = 8000
    dit_batch: int = 32
    dit_lr: float = 1e-3
    dit_warmup: int = 100
    caption_dropout: float = 0.1
    # F-Lite shifts timesteps by alpha = 2*sqrt(h*w/4096) latent pixels: 0.25 at 64x64, which
    # puts nearly all training and sampling steps at low noise, where a 64 px scene's layout is
    # no longer decided. False trains (and samples, shift 1) on the unshifted schedule.
    resolution_shift: bool = TINY_MODEL_SETTINGS["train"]["resolution_shift"]
    # Measured with the sampling `init --model tiny` configures (one source for both).
    eval_steps: int = TINY_MODEL_SETTINGS["sample"]["steps"]
    eval_guidance: float = TINY_MODEL_SETTINGS["sample"]["guidance_scale"]
    eval_images_per_prompt: int = 4

    @classmethod
    def quick(cls, seed: int) -> "Recipe":
        """A smoke run: proves the script works end to end; the model it makes draws little."""
        return cls(seed=seed, vae_steps=20, vae_images=64, scenes=96, dit_steps=10, dit_batch=8,
                   eval_images_per_prompt=1)


# --- 1. the VAE ---------------------------------------------------------------------------------

def scene_tensor(scenes) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] (all scenes the same size)."""
    from ditctl.demo.scenes import render

    pixels = np.stack([np.asarray(render(s)) for s in scenes])  # [N, H, W, 3] uint8
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(recipe: Recipe, log) -> Any:
    """Reconstruction (L1 + MSE) plus a small KL, on 64x64 scenes of every colour; the first
    30% of steps decode the posterior mean (fast start), the rest a posterior sample."""
    from diffusers import AutoencoderKL

    from ditctl.demo.scenes import random_scenes

    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    images = scene_tensor(random_scenes(recipe.vae_images, recipe.seed + 1, sizes=((64, 64),)))
    optimizer = torch.optim.Adam(vae.parameters(), lr=recipe.vae_lr)
    steps = recipe.vae_steps
    warmup = max(1, min(50, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * (1 - s / steps)))
    generator = torch.Generator().manual_seed(recipe.seed)
    latent_elements = VAE_CONFIG["latent_channels"] * 8 * 8
    started = time.perf_counter()
    for step in range(1, steps + 1):
        batch = images[torch.randint(0, len(images), (recipe.vae_batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean if step <= 0.3 * steps else posterior.sample(generator)
        recon = vae.decode(z).sample
        loss = ((recon - batch).abs().mean() + (recon - batch).pow(2).mean()
                + recipe.vae_kl_weight * posterior.kl().mean() / latent_elements)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} "
                f"({time.perf_counter() - started:.0f} s)")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def vae_report(vae: Any, seed: int, n: int = 200) -> dict[str, Any]:
    """How well the codec alone keeps what the metric reads: score of reconstructions."""
    from ditctl.demo.concepts import score
    from ditctl.demo.scenes import ASPECT_SIZES, random_scenes

    scenes = random_scenes(n, seed + 2, sizes=ASPECT_SIZES)
    images, l1 = [], []
    for scene in scenes:
        x = scene_tensor([scene])
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        l1.append(float((recon - x).abs().mean()) * 127.5)
        images.append(((recon[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    result = score(images, [dataclasses.asdict(s) for s in scenes])
    return {"reconstruction_both": result["both"], "reconstruction_colour": result["colour"],
            "reconstruction_shape": result["shape"], "mean_abs_error_rgb": float(np.mean(l1))}


@torch.no_grad()
def set_latent_statistics(vae: Any, scenes) -> dict[str, float]:
    """shift_factor / scaling_factor from the posterior means of the DiT's training images
    (one scalar each, over every channel and position, as F-Lite's VAE config holds them)."""
    means = [vae.encode(scene_tensor([scene])).latent_dist.mean.flatten() for scene in scenes]
    values = torch.cat(means)
    shift, std = float(values.mean()), float(values.std())
    vae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(1.0 / std, 6))
    return {"shift_factor": round(shift, 6), "scaling_factor": round(1.0 / std, 6)}


# --- 2 + 3. the pipeline and the DiT ------------------------------------------------------------

def assemble_pipeline(folder: Path, vae: Any, seed: int, dit_init: Path | None = None) -> Path:
    """A complete F-Lite folder: the tiny random T5 + tokenizer of `ditctl.models.tiny`, the
    trained VAE, and an untrained DiT with F-Lite's init (or, with `dit_init`, the DiT of that
    model folder to continue from)."""
    from ditctl.models.flite_dit import DiT
    from ditctl.models.tiny import build_tiny_pipeline, tiny_dit_config

    build_tiny_pipeline(folder, seed=seed, t5_dim=T5_DIM)  # its VAE and DiT are replaced below
    shutil.rmtree(folder / "vae")
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    shutil.rmtree(folder / "dit_model")
    if dit_init is not None:
        dit = DiT.from_pretrained(dit_init / "dit_model", torch_dtype=torch.float32)
    else:
        torch.manual_seed(seed)
        dit = DiT(**tiny_dit_config(T5_DIM, **DIT_SHAPE))  # zero output / modulation: F-Lite's init
    dit.save_pretrained(folder / "dit_model", safe_serialization=True)
    return folder


def base_workspace(root: Path, pipeline: Path, recipe: Recipe, threads: int) -> Any:
    """A ditctl workspace whose data are the base scenes (no held-out concept)."""
    import tomli_w

    from ditctl.demo.scenes import base_training_scenes, write_dataset
    from ditctl.workspace import Workspace

    root.mkdir(parents=True)
    write_dataset(root / "data", base_training_scenes(recipe.scenes, recipe.seed + 3,
                                                      sizes=recipe.scene_sizes),
                  csv_name="train.csv")
    settings = {
        "model": {"pretrained_model_path": str(pipeline)},
        "data": {"train_data_path": "data/train.csv", "resolution": 64,
                 "use_resolution_buckets": True},
        "precompute": {"batch_size": 64, "num_workers": 0},
        "eval": {"holdout_fraction": 0.0},  # no validation: every scene trains
        "train": {"seed": recipe.seed, "train_batch_size": recipe.dit_batch,
                  "max_steps": recipe.dit_steps, "learning_rate": recipe.dit_lr,
                  "lr_scheduler": "cosine", "num_warmup_steps": recipe.dit_warmup,
                  "caption_dropout": recipe.caption_dropout,
                  "resolution_shift": recipe.resolution_shift,
                  "use_precomputed_data": True, "sample_every": 0, "eval_every": 0,
                  "checkpoint_every": recipe.dit_steps, "checkpoints_total_limit": 1,
                  "report_to": "none", "run_name": "base"},
    }
    (root / "project.toml").write_text(tomli_w.dumps(settings))
    (root / "prompts.txt").write_text("a red circle on a white background\n")
    return Workspace(root)


def train_dit(ws: Any, log) -> tuple[Path, dict[str, Any]]:
    """ingest -> precompute -> full fine-tuning from the cache, all through ditctl."""
    from ditctl.data.ingest import run_ingest
    from ditctl.precompute import run_precompute
    from ditctl.train import run_training

    config = ws.config()
    started = time.perf_counter()
    run_ingest(ws, config, workers=1)
    run_precompute(ws, config)
    log(f"ingest + precompute: {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    outcome = run_training(ws, config)
    seconds = time.perf_counter() - started
    result = outcome.result
    log(f"dit: {result.steps} steps, final loss {result.final_loss:.4f}, {seconds:.0f} s")
    return Path(result.checkpoint), {"steps": result.steps, "final_loss": result.final_loss,
                                     "train_seconds": round(seconds, 1)}


# --- 4. ship and measure ------------------------------------------------------------------------

def write_assets(out: Path, pipeline: Path, checkpoint: Path) -> None:
    """The trained DiT (fp16) with the pipeline's encoders, swapped into `out` atomically."""
    from ditctl.engine.loading import load_denoiser
    from ditctl.models.registry import load_family

    denoiser = load_denoiser(load_family(pipeline), checkpoint)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    denoiser.to(torch.float16).save_pretrained(tmp / "dit_model", safe_serialization=True)
    _drop_rope_buffers(tmp / "dit_model" / "diffusion_pytorch_model.safetensors")
    for component in ("text_encoder", "tokenizer", "vae"):
        shutil.copytree(pipeline / component, tmp / component)
    shutil.copy2(pipeline / "model_index.json", tmp / "model_index.json")
    old = out.with_name(f".old-{out.name}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def measure(model_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """Concept scores of the shipped folder, loaded the way ditctl loads any model."""
    from ditctl.demo.concept_check import (concept_scores, held_out_prompts, sample_settings,
                                           trained_prompts)
    from ditctl.models.registry import load_family

    family = load_family(model_dir)
    denoiser = family.load_denoiser(torch.float32).eval()
    vae, text_encoder = family.load_vae(), family.load_text_encoder()
    settings = sample_settings(steps=recipe.eval_steps, guidance_scale=recipe.eval_guidance,
                               images_per_prompt=recipe.eval_images_per_prompt,
                               shift=None if recipe.resolution_shift
                               else TINY_MODEL_SETTINGS["sample"]["shift"])
    out: dict[str, Any] = {}
    for name, prompts in (("trained", trained_prompts()), ("held_out", held_out_prompts())):
        result = concept_scores(family, denoiser, vae, text_encoder, prompts, settings)
        out[name] = {k: result[k] for k in ("n", "colour", "shape", "both")}
    return out


def folder_bytes(folder: Path) -> dict[str, int]:
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
             for p in sorted(folder.iterdir()) if p.is_dir()}
    sizes["total"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return sizes


def training_md(recipe: Recipe, results: dict[str, Any], command: str) -> str:
    m = results["metrics"]
    size = results["sizes_bytes"]
    lines = [
        "# The tiny F-Lite base model",
        "",
        "A complete F-Lite-layout pipeline (model_index.json, dit_model/, text_encoder/,",
        "tokenizer/, vae/) small enough to ship inside ditctl and to train on a laptop CPU.",
        "It draws one coloured shape on a plain background (`ditctl.demo.scenes`) and has",
        f"never seen the colour **{results['held_out']}**: that is what the `ditctl init",
        "--example` dataset teaches a LoRA.",
        "",
        f"Made by `{command}` on {results['date']} ({results['machine']}), "
        f"in {results['total_seconds']:.0f} s.",
        "",
        "| part | what | how it was trained |",
        "| --- | --- | --- |",
        f"| vae | AutoencoderKL, 16 latent channels, 8x, channels {VAE_CONFIG['block_out_channels']}"
        f" | {recipe.vae_steps} steps of L1 + MSE + {recipe.vae_kl_weight:g} KL, batch "
        f"{recipe.vae_batch}, on 64x64 scenes of every colour |",
        f"| text_encoder | T5 encoder, 8 layers, d_model {T5_DIM}, random weights | not trained |",
        "| tokenizer | T5 unigram tokenizer built from a word list | - |",
        f"| dit_model | F-Lite DiT, hidden {DIT_SHAPE['hidden']}, depth {DIT_SHAPE['depth']}, "
        f"{DIT_SHAPE['heads']} heads, patch {DIT_SHAPE['patch_size']}, stored fp16 | ditctl's engine, full fine-tuning from the "
        f"precompute cache: {recipe.dit_steps} steps, batch {recipe.dit_batch}, lr "
        f"{recipe.dit_lr:g} (cosine), caption dropout {recipe.caption_dropout:g}, "
        f"{recipe.scenes} scenes without {results['held_out']} |",
        "",
        *([f"Stage 3 started from the DiT of `{results['dit_init']}` (`--dit-init`), the "
           "previous shipped model, trained when prompts were encoded at 32 tokens; these "
           f"{recipe.dit_steps} steps adapt it to F-Lite's 512-token encoding.", ""]
          if results.get("dit_init") else []),
        *([f"Stage 1 (the VAE) was skipped: `--vae` reused the VAE of an earlier run of this "
           f"script with the same seed and recipe; run without `--vae` to retrain it.", ""]
          if results.get("vae_reused") else []),
        f"Seed {recipe.seed}. Latent scaling_factor {results['latents']['scaling_factor']}, "
        f"shift_factor {results['latents']['shift_factor']}.",
        "",
        "## Measured (ditctl.demo.concept_check, fixed prompts and seeds)",
        "",
        f"Sampling: {recipe.eval_steps} Euler steps, CFG {recipe.eval_guidance:g}, "
        f"{recipe.eval_images_per_prompt} images per prompt, 64x64.",
        "",
        "| prompts | images | colour right | shape right | both right |",
        "| --- | --- | --- | --- | --- |",
        f"| trained colours x shapes | {m['trained']['n']} | {m['trained']['colour']:.0%} | "
        f"{m['trained']['shape']:.0%} | {m['trained']['both']:.0%} |",
        f"| held-out colour ({results['held_out']}) | {m['held_out']['n']} | "
        f"{m['held_out']['colour']:.0%} | {m['held_out']['shape']:.0%} | "
        f"{m['held_out']['both']:.0%} |",
        "",
        f"VAE alone (reconstructions of 200 scenes): both right "
        f"{results['vae']['reconstruction_both']:.0%}, mean abs error "
        f"{results['vae']['mean_abs_error_rgb']:.1f}/255.",
        f"DiT training: final loss {results['dit']['final_loss']:.4f}, "
        f"{results['dit']['train_seconds']:.0f} s.",
        "",
        f"Sizes: total {size['total'] / 2**20:.1f} MiB ("
        + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in size.items() if k != "total") + ").",
        "",
    ]
    return "\n".join(lines)


def _drop_rope_buffers(weights: Path) -> None:
    """F-Lite's RoPE tables (16 MiB here) are recomputed by every loader (ditctl's and F-Lite's
    own), so the shipped model leaves them out to stay small."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("rope.")}
    save_file(tensors, weights, metadata=metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the model goes")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder (default: a temporary folder, deleted after)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--vae", type=Path, default=None,
                        help="skip stage 1 and use this VAE folder (the vae/ of an earlier run's "
                             "--work pipeline made with the same seed)")
    parser.add_argument("--dit-init", type=Path, default=None,
                        help="start stage 3 from the dit_model/ of this model folder (e.g. the "
                             "shipped model, to adapt it to a changed text encoding) instead "
                             "of F-Lite's init")
    parser.add_argument("--dit-steps", type=int, default=None, help="override the recipe's")
    parser.add_argument("--dit-lr", type=float, default=None, help="override the recipe's")
    parser.add_argument("--eval-images", type=int, default=None,
                        help="images per prompt in the final measurement (recipe: 4)")
    parser.add_argument("--quick", action="store_true",
                        help="a seconds-long smoke run (writes to --out; records nothing)")
    args = parser.parse_args(argv)
    offline_environment()
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    recipe = Recipe.quick(args.seed) if args.quick else Recipe(seed=args.seed)
    overrides = {k: v for k, v in (("dit_steps", args.dit_steps), ("dit_lr", args.dit_lr),
                                   ("eval_images_per_prompt", args.eval_images)) if v is not None}
    recipe = dataclasses.replace(recipe, **overrides)
    command = "python bench/train_tiny_base.py" + (f" --seed {args.seed}" if args.seed else "") \
        + (f" --vae {args.vae}" if args.vae else "") \
        + (f" --dit-init {args.dit_init}" if args.dit_init else "") \
        + "".join(f" --{k.replace('_', '-')} {v}" for k, v in (
            ("dit-steps", args.dit_steps), ("dit-lr", args.dit_lr),
            ("eval-images", args.eval_images)) if v is not None)
    stamp = machine_stamp()
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    from ditctl.demo.scenes import HELD_OUT, base_training_scenes

    work_ctx = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(work_ctx.name) if work_ctx else args.work
    try:
        if args.work is not None and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        if args.vae:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False)
            log(f"vae: reused {args.vae} (stage 1 skipped)")
        else:
            vae = train_vae(recipe, log)
        vae_quality = vae_report(vae, recipe.seed, n=200 if not args.quick else 10)
        log(f"vae reconstructions: {vae_quality}")
        stats_scenes = base_training_scenes(min(recipe.scenes, 1000), recipe.seed + 3,
                                            sizes=recipe.scene_sizes)
        latents = set_latent_statistics(vae, stats_scenes)
        log(f"latent statistics: {latents}")
        pipeline = assemble_pipeline(work / "pipeline", vae, recipe.seed, args.dit_init)
        ws = base_workspace(work / "workspace", pipeline, recipe, args.threads or 0)
        checkpoint, dit = train_dit(ws, log)
        write_assets(args.out, pipeline, checkpoint)
    finally:
        if work_ctx:
            work_ctx.cleanup()
    metrics = measure(args.out, recipe)
    log(f"concept scores: {metrics}")
    total = time.perf_counter() - started
    results = {"date": stamp["date"], "machine": f"{stamp['cpu']}, {stamp['cores']} cores, "
               f"{stamp['torch_threads']} torch threads", "held_out": HELD_OUT[1],
               "total_seconds": total, "recipe": dataclasses.asdict(recipe), "vae": vae_quality,
               "latents": latents, "dit": dit, "metrics": metrics, "vae_reused": bool(args.vae),
               "sizes_bytes": folder_bytes(args.out),
               "dit_init": str(args.dit_init) if args.dit_init else None}
    if args.quick:
        log("quick run: nothing recorded")
        return 0
    (args.out / "TRAINING.md").write_text(training_md(recipe, results, command))
    flat = {"command": command, "seed": recipe.seed, "vae_steps": recipe.vae_steps,
            "dit_steps": dit["steps"], "dit_final_loss": dit["final_loss"],
            "dit_train_s": dit["train_seconds"], "vae_reconstruction_both":
            vae_quality["reconstruction_both"], "trained_both": metrics["trained"]["both"],
            "trained_colour": metrics["trained"]["colour"],
            "trained_shape": metrics["trained"]["shape"],
            "held_out_colour": metrics["held_out"]["colour"],
            "held_out_both": metrics["held_out"]["both"], "images_per_set":
            f"{metrics['trained']['n']} / {metrics['held_out']['n']}",
            "size_mib": round(results["sizes_bytes"]["total"] / 2**20, 2),
            "target_trained_ge_80pct": metrics["trained"]["both"] >= 0.8,
            "target_held_out_le_20pct": metrics["held_out"]["colour"] <= 0.2}
    append_results(RESULTS_FILE, results_block("tiny base model", False, stamp, flat, total))
    log(f"wrote {args.out} and appended to {RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
