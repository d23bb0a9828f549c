"""What every benchmark shares: the machine stamp, timing, isolated memory measurement, model
shapes and their FLOP counts, benchmark pipelines/workspaces, and the results file.

Memory is measured in a fresh child process per configuration (`measure_isolated`), as the peak
resident set size above the RSS right after the imports. The peak is the kernel's per-process
high-water mark `VmHWM` from /proc/self/status, which is what `resource.getrusage` reports for
a process that was started normally; getrusage is not used because Linux carries `ru_maxrss`
over `exec`, so a child started by a large parent reports the parent's size (measured: a child
of a 1.5 GB parent reports 1.5 GB). `VmHWM` can also be reset (`reset_peak_rss`), which lets a
child measure one phase, e.g. the activations of one backward pass. Children run with glibc's
mmap threshold fixed at 64 KiB (unless asked not to), so every freed tensor is returned to the
kernel at once and RSS follows the live tensors instead of malloc's free lists; that makes
allocations slower, so step times that matter are measured without it or in-process.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = REPO_ROOT / "bench" / "RESULTS.md"
CHILD_MARKER = "BENCH-RESULT "
RESULTS_HEADER = """# Benchmark results

Appended by `python -m bench [NAMES...]` (see docs/performance.md for what each number means).
Each block is one benchmark run: when, on what machine, quick (smoke) or full. Never edit or
reorder old blocks; compare numbers only within one block (the machines are shared and noisy).
"""


def offline_environment() -> None:
    """No downloads, no library chatter: benchmarks only build local random models."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from ditctl.console import quiet_libraries

    quiet_libraries()


# --- the machine stamp ------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_stamp() -> dict[str, Any]:
    """Where and when a result was measured (one line of it goes above every results block)."""
    import torch

    from ditctl import __version__

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(),
            "cores": usable_cores(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": device, "python": platform.python_version(),
            "ditctl": __version__, "commit": git_commit(), "load_avg_1m": round(load, 2)}


def stamp_line(stamp: dict[str, Any]) -> str:
    return (f"{stamp['cpu']} · {stamp['cores']} cores ({stamp['torch_threads']} torch threads) · "
            f"torch {stamp['torch']} · device {stamp['device']} · Python {stamp['python']} · "
            f"ditctl {stamp['ditctl']} @ {stamp['commit']} · load avg {stamp['load_avg_1m']}")


# --- timing -----------------------------------------------------------------------------------

@dataclass
class Timing:
    """Seconds of the repeats that count (after warm-up)."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def best(self) -> float:
        return min(self.values)


def time_repeats(work: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
    """Run `work` warmup + repeats times; the warm-up runs (first-call allocations, kernel
    choices, page faults of fresh buffers) are not counted."""
    for _ in range(warmup):
        work()
    values = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        values.append(time.perf_counter() - started)
    return Timing(values)


def matmul_peak_flops(dtype_name: str, size: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of one large square torch.matmul in `dtype_name` ("fp32"/"bf16"): the best of
    `repeats` after a warm-up (the best is the closest to the machine's peak on a shared host)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)

    def work() -> None:
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()

    return 2 * size ** 3 / time_repeats(work, repeats).best


# --- memory -----------------------------------------------------------------------------------

def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def rss_bytes() -> int:
    """This process's resident set size now."""
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started (or since `reset_peak_rss`)."""
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Set the peak RSS back to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held in the optimiser's per-parameter state tensors (moments, 8-bit maps, ...)."""
    import torch

    return tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor))


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
CHILD_ENV = {**MALLOC_ENV, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Imported before a child's baseline, so that what a configuration imports lazily does not
# count as its memory.
CHILD_PRELOAD = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes",
                 "diffusers.optimization", "ditctl.train", "ditctl.engine.loop",
                 "ditctl.engine.setup", "ditctl.data.cache", "ditctl.data.batches",
                 "ditctl.models.flite")


def measure_isolated(calls: dict[str, tuple[str, dict[str, Any]]], *, share_process: bool = False,
                     malloc_tuning: bool = True, timeout: float = 900) -> dict[str, dict[str, Any]]:
    """Run each call `label: ("module:function", kwargs)` in a fresh Python process and return
    its result dict plus `memory`: the RSS after the imports (baseline), the peak RSS, and the
    peak above the baseline (bytes).

    `share_process` (quick smoke runs): one child runs all the calls one after the other, each
    measured from the RSS left by the previous one; it saves a process start (~5 s of imports)
    per call, and the numbers are less clean. `malloc_tuning=False` runs the child with glibc's
    defaults, as a user's `ditctl train` runs: use it where the child's step times count (the
    fixed mmap threshold makes every tensor allocation a fresh mapping, which slows steps).
    """
    groups = [list(calls.items())] if share_process else [[item] for item in calls.items()]
    results: dict[str, dict[str, Any]] = {}
    for group in groups:
        outputs = _run_child([call for _, call in group], timeout, malloc_tuning)
        results.update(zip((label for label, _ in group), outputs))
    return results


def _run_child(calls: list[tuple[str, dict[str, Any]]], timeout: float,
               malloc_tuning: bool) -> list[dict[str, Any]]:
    import torch

    env = {**os.environ, **CHILD_ENV}
    if not malloc_tuning:
        for name in MALLOC_ENV:
            env.pop(name, None)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # as many threads as this process
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "bench.common", json.dumps(calls)]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(CHILD_MARKER):
            return json.loads(line[len(CHILD_MARKER):])
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
    raise RuntimeError(f"isolated run of {calls} failed (exit {done.returncode}):\n{tail}")


def _child_main(calls_json: str) -> None:
    import gc
    import importlib

    offline_environment()
    for name in CHILD_PRELOAD:
        importlib.import_module(name)
    results = []
    for target, kwargs in json.loads(calls_json):
        module_name, function_name = target.split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        gc.collect()
        baseline = rss_bytes()
        reset_peak_rss()
        result = function(**kwargs)
        peak = peak_rss_bytes()
        result.setdefault("memory", {}).update({
            "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
            "peak_above_baseline_bytes": peak - baseline})
        results.append(result)
        del result
    print(CHILD_MARKER + json.dumps(results), flush=True)


# --- model shapes and FLOPs -----------------------------------------------------------------------

@dataclass(frozen=True)
class DitShape:
    """An F-Lite DiT's shape (the released choices otherwise: patch 2, 16 latent channels,
    MLP ratio 4, residual V, no biases/RMS weights, RoPE)."""

    hidden: int
    depth: int
    heads: int
    text_dim: int  # cross_attn_input_size (= the text encoder's d_model)

    def config(self) -> dict:
        from ditctl.models.tiny import tiny_dit_config

        return tiny_dit_config(self.text_dim, hidden=self.hidden, depth=self.depth,
                               heads=self.heads)

    def label(self) -> str:
        return f"hidden {self.hidden}, depth {self.depth}, heads {self.heads}, text {self.text_dim}"


@dataclass(frozen=True)
class T5Shape:
    """A T5 encoder (gated-GELU, as T5-XXL); F-Lite reads hidden_states[-8], so >= 8 layers."""

    d_model: int
    d_ff: int
    layers: int = 8
    heads: int = 12
    d_kv: int = 64


# The released 10B F-Lite and the small configurations that keep its proportions.
RELEASED_FLITE = DitShape(3072, 40, 12, 4096)
RELEASED_PARAMS = {"dit": 9_785_401_448, "text_encoder": 4_700_000_000, "vae": 84_000_000}
SMALL_FLITE = DitShape(768, 6, 12, 768)        # 94.6 M parameters
SMALL_T5 = T5Shape(768, 1440)                  # 45.6 M: 0.48 x the DiT, as T5-XXL / F-Lite
SMALL_VAE = (32, 48, 48, 48)                   # ~0.8 M: ~0.9 % of the DiT, as F-Lite's VAE
MID_FLITE = DitShape(384, 6, 6, 384)           # 23.7 M (activation measurements at batch 8)
SCALING_FLITE = DitShape(256, 4, 4, 256)       # 7.3 M (resolutions up to 128^2 latents)
TINY_FLITE = DitShape(64, 2, 4, 32)            # quick (smoke) runs
TINY_T5 = T5Shape(32, 64, heads=4, d_kv=8)
TINY_VAE = (8, 16, 16, 16)
TEXT_TOKENS = 32  # the tiny tokenizer's max length (F-Lite itself uses 512)
REGISTERS = 16


def dit_parameters(shape: DitShape) -> int:
    """Parameter count of a DiT of this shape (built on the meta device: no memory, no time)."""
    import torch

    from ditctl.models.flite_dit import DiT

    with torch.device("meta"):
        model = DiT(**shape.config())
    return sum(p.numel() for p in model.parameters())


def image_tokens(latent_h: int, latent_w: int, patch: int = 2) -> int:
    """Tokens the DiT's blocks see: the patches plus the 16 registers."""
    return (latent_h // patch) * (latent_w // patch) + REGISTERS


def matmul_params_per_token(shape: DitShape, mlp_ratio: float = 4.0) -> int:
    """Weights of the linear layers every image token goes through, per token, all blocks:
    self-attention qkv (3H²) and out (H²), cross-attention q (H²) and out (H²), MLP (2·r·H²).
    The text K/V projection runs on text tokens and adaLN on one vector per sample, so they are
    counted separately (text) or not at all (adaLN: one token per sample)."""
    h = shape.hidden
    return int(shape.depth * (6 * h * h + 2 * mlp_ratio * h * h))


def training_flops(shape: DitShape, latent_hw: tuple[int, int], batch: int,
                   text_tokens: int = TEXT_TOKENS) -> int:
    """Model FLOPs of one training step (forward + backward, = 3 x forward), no recomputation:

        6 x (matmul params per token) x tokens             image-token linear layers
      + 6 x depth x (2 x H x D_text) x text tokens         text K/V projections
      + 12 x depth x tokens² x H                           self-attention QK^T and AV
      + 12 x depth x tokens x text tokens x H              cross-attention QK^T and AV
    per sample, times the batch. (A multiply-add is 2 FLOPs; backward is twice the forward.)"""
    t = image_tokens(*latent_hw)
    h, depth = shape.hidden, shape.depth
    linear = 6 * matmul_params_per_token(shape) * t
    text_kv = 6 * depth * 2 * h * shape.text_dim * text_tokens
    self_attn = 12 * depth * t * t * h
    cross_attn = 12 * depth * t * text_tokens * h
    return batch * (linear + text_kv + self_attn + cross_attn)


# --- pipelines and workspaces -----------------------------------------------------------------

def random_dit(shape: DitShape, seed: int = 0):
    """A DiT of `shape` with random weights, initialised as ditctl's tiny pipelines are (small
    random values in the zero-initialised output/modulation layers, so gradients are real)."""
    import torch

    from ditctl.models.flite_dit import DiT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = DiT(**shape.config())
        with torch.no_grad():
            for name, param in dit.named_parameters():
                if "adaLN_modulation" in name or "final_modulation" in name or "final_proj" in name:
                    param.normal_(0.0, 0.02)
    return dit


FLITE_WIDTH = DitShape(3072, 1, 12, 4096)  # the released width; depth is varied


def write_sharded_dit(folder: Path, shape: DitShape, *, dtype_name: str = "bf16",
                      shard_bytes: int = 256 * 2**20, seed: int = 0) -> dict[str, Any]:
    """A DiT of `shape` with random weights written straight to sharded safetensors (config.json,
    shards, index), one tensor at a time: a full-width model never has to fit in memory twice,
    and building it costs no more than writing it. Weights: N(0, 0.02²), norms 1, as a trained
    model's scale (the zero-initialised output layers are random too, so gradients are real).
    Returns {"parameters", "bytes", "shards"}."""
    import torch
    from safetensors.torch import save_file

    from ditctl.models.flite_dit import DiT

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        skeleton = DiT(**shape.config())
    config = {"_class_name": "DiT", **shape.config()}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generator = torch.Generator().manual_seed(seed)
    shards: list[dict[str, Any]] = [{}]
    sizes = [0]
    total_params = 0
    for name, param in skeleton.named_parameters():
        if name.endswith("lambda_param"):
            value = torch.full(param.shape, 0.5)
        elif param.dim() == 1 and "norm" in name:
            value = torch.ones(param.shape)
        else:
            value = torch.empty(param.shape).normal_(0.0, 0.02, generator=generator)
        value = value.to(dtype)
        if sizes[-1] and sizes[-1] + value.nbytes > shard_bytes:
            _flush_shard(folder, shards, len(shards))  # only its key list stays in memory
            shards.append({})
            sizes.append(0)
        shards[-1][name] = value
        sizes[-1] += value.nbytes
        total_params += value.numel()
    weight_map = {}
    count = len(shards)
    for index, shard in enumerate(shards, 1):
        file = f"diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"
        for key in shard.get("__keys__", shard):
            weight_map[key] = file
        tmp = folder / f"shard-{index:05d}.tmp"
        if tmp.exists():
            tmp.rename(folder / file)
        else:
            save_file(shard, folder / file)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2) + "\n")
    return {"parameters": total_params, "bytes": sum(sizes), "shards": count}


def _flush_shard(folder: Path, shards: list[dict], index: int) -> None:
    """Write a full shard under a temporary name and keep only its key list in memory."""
    from safetensors.torch import save_file

    shard = shards[index - 1]
    save_file(shard, folder / f"shard-{index:05d}.tmp")
    shards[index - 1] = {"__keys__": list(shard)}


def build_bench_pipeline(folder: Path, dit: DitShape, t5: T5Shape, vae_channels: tuple[int, ...],
                         seed: int = 0) -> Path:
    """An F-Lite-layout model folder with random weights: ditctl's tiny pipeline (tokenizer,
    VAE of `vae_channels`), with the text encoder and DiT replaced by ones of the given shapes
    (tiny.py's T5 has fixed heads and layers, its DiT 4 heads)."""
    import shutil

    import torch
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    from ditctl.models.tiny import build_tiny_pipeline

    folder = build_tiny_pipeline(Path(folder), seed, dit_hidden=64, dit_depth=1,
                                 t5_dim=t5.d_model, vae_channels=vae_channels)
    vocab = len(T5TokenizerFast.from_pretrained(folder / "tokenizer"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        encoder = T5EncoderModel(T5Config(
            vocab_size=vocab, d_model=t5.d_model, d_kv=t5.d_kv, d_ff=t5.d_ff,
            num_layers=t5.layers, num_heads=t5.heads, relative_attention_num_buckets=8,
            relative_attention_max_distance=32, dropout_rate=0.0, feed_forward_proj="gated-gelu",
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False))
    shutil.rmtree(folder / "text_encoder")
    encoder.save_pretrained(folder / "text_encoder")
    del encoder
    shutil.rmtree(folder / "dit_model")
    random_dit(dit, seed + 2).save_pretrained(folder / "dit_model", safe_serialization=True)
    return folder


def component_parameters(model_dir: Path) -> dict[str, int]:
    """Parameters per component of a model folder, read from the safetensors headers."""
    from safetensors import safe_open

    counts = {}
    for component in ("dit_model", "text_encoder", "vae"):
        total = 0
        for file in sorted((Path(model_dir) / component).glob("*.safetensors")):
            with safe_open(file, "pt") as handle:
                for key in handle.keys():
                    total += math.prod(handle.get_slice(key).get_shape())
        counts[component] = total
    return counts


def make_bench_workspace(root: Path, model_dir: Path, *, images: int, size: int, seed: int = 0,
                         train: dict | None = None, lora: dict | None = None,
                         data: dict | None = None, precompute: dict | None = None):
    """A workspace on `model_dir` with `images` generated scenes of size x size (no validation
    split, no samples or evaluation during training, no trackers); `data`, `precompute`: more
    keys of those tables."""
    import tomli_w

    from ditctl.demo.scenes import random_scenes, write_dataset
    from ditctl.workspace import Workspace

    root = Path(root)
    root.mkdir(parents=True)
    write_dataset(root / "data", random_scenes(images, seed, sizes=((size, size),)),
                  csv_name="train.csv")
    settings = {
        "model": {"pretrained_model_path": str(model_dir)},
        "data": {"train_data_path": "data/train.csv", "resolution": size, "center_crop": True,
                 **(data or {})},
        "precompute": {"num_workers": 0, **(precompute or {})},
        "train": {"sample_every": 0, "eval_every": 0, "report_to": "none", "seed": 0,
                  "lr_scheduler": "constant", **(train or {})},
        "eval": {"holdout_fraction": 0.0},
        "lora": lora or {},
    }
    (root / "project.toml").write_text(tomli_w.dumps(settings))
    (root / "prompts.txt").write_text("")
    return Workspace(root)


def reset_accelerate() -> None:
    """accelerate keeps one process-wide state; each run_training in one process needs a fresh
    one (another mixed precision would otherwise be refused)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@contextlib.contextmanager
def quiet_console() -> Iterator[None]:
    from ditctl.console import console

    previous, console.quiet = console.quiet, True
    try:
        yield
    finally:
        console.quiet = previous


def read_train_log(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(run_dir) / "train_log.jsonl").read_text()
            .splitlines() if line.strip()]


# --- results ----------------------------------------------------------------------------------

def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value)
    return str(value)


def flatten(results: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested results as (dotted key, formatted value) rows, in insertion order."""
    rows = []
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(flatten(value, name + "."))
        else:
            rows.append((name, _format(value)))
    return rows


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_format(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *cells)]

    def line(values) -> str:
        return "| " + " | ".join(str(v).ljust(w) for v, w in zip(values, widths)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def rows_table(rows: list[dict[str, Any]]) -> str:
    """Row dicts (one per measured configuration) as one markdown table."""
    headers = list(dict.fromkeys(k for row in rows for k in row))
    return markdown_table(headers, [[row.get(h, "") for h in headers] for row in rows])


def render_results(results: dict[str, Any]) -> str:
    """A benchmark's results as markdown: its `table` (row dicts, one per measured
    configuration) or its titled `tables`, then every other number as a metric | value table."""
    parts = []
    if results.get("table"):
        parts.append(rows_table(results["table"]))
    for title, rows in (results.get("tables") or {}).items():
        parts.append(f"{title}:\n\n{rows_table(rows)}")
    rest = {k: v for k, v in results.items() if k not in ("table", "tables")}
    if rest:
        parts.append(markdown_table(["metric", "value"], [list(r) for r in flatten(rest)]))
    return "\n\n".join(parts)


def results_block(name: str, quick: bool, stamp: dict[str, Any], results: dict[str, Any],
                  elapsed_s: float) -> str:
    mode = "quick (smoke run)" if quick else "full"
    return (f"## {name} · {stamp['date']} · {mode}\n\n"
            f"Machine: {stamp_line(stamp)} · took {elapsed_s:.0f} s\n\n"
            f"{render_results(results)}\n")


def append_results(path: Path, block: str) -> None:
    """Append one block to the results file (created with its header when absent); the
    existing content is kept byte for byte, and the file is replaced atomically."""
    from ditctl.fsutil import atomic_write_text

    path = Path(path)
    existing = path.read_text(encoding="utf-8") if path.exists() else RESULTS_HEADER
    if not existing.endswith("\n"):
        existing += "\n"
    atomic_write_text(path, existing + "\n" + block)


def report_standalone(name: str, module: str, quick: bool, results: dict[str, Any],
                      started: float, argv: list[str] | None, record: bool) -> None:
    """A benchmark run as `python -m bench.<module> ARGS`: print its block, headed by that
    command line, and append it to bench/RESULTS.md unless `record` is False."""
    block = results_block(name, quick, machine_stamp(), results, time.perf_counter() - started)
    arguments = " ".join(argv if argv is not None else sys.argv[1:])
    block = block.replace("\n\n", f"\n\n`python -m bench.{module} {arguments}`\n\n", 1)
    print(block, flush=True)
    if record:
        append_results(RESULTS_FILE, block)


def mb(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


if __name__ == "__main__":
    _child_main(sys.argv[1])
