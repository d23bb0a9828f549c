"""Start-up time of the commands that do little: `status`, `--help`, `ingest` with nothing to do.

    python -m bench startup [--quick]

Builds a workspace as the demo does (`ditctl init --model tiny --example`, then `ditctl
ingest`), then runs each command the way a user does: the `ditctl` script in a fresh process,
output discarded, `repeats` times (5; --quick: 1) after one warm-up run (page cache; none
with --quick): wall-clock seconds, and the CPU seconds (user + system) of the process, which
other work on a shared machine inflates far less than the wall clock. Side by side:
  python_floor   `python -c pass`: the interpreter's own start-up, the floor for any command
  ml_imports     `python -c "import torch, diffusers, transformers, peft"`: what `status` used
                 to import before its first line (not measured with --quick)
Target: `ditctl status` under 1 s (median). tests/cli/test_startup.py checks, without timing,
that these commands import none of the ML stack.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


COMMANDS = {"status": ["status"], "help": ["--help"], "ingest_nothing_to_do": ["ingest"]}
ML_IMPORTS = "import torch, diffusers, transformers, peft"


def ditctl_command() -> list[str]:
    """The installed `ditctl` script next to this interpreter, else `python -m ditctl`."""
    script = Path(sys.executable).with_name("ditctl")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ditctl"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_quietly(argv: list[str], cwd: Path) -> None:
    done = subprocess.run(argv, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")


def timed(argv: list[str], cwd: Path, repeats: int, warmup: bool = True) -> dict:
    """A warm-up run, then `repeats` runs: median and best wall-clock and CPU seconds."""
    if warmup:
        run_quietly(argv, cwd)
    wall, cpu = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        run_quietly(argv, cwd)
        wall.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return {"median_s": round(statistics.median(wall), 3), "best_s": round(min(wall), 3),
            "median_cpu_s": round(statistics.median(cpu), 3), "runs": repeats}


def run(quick: bool) -> dict:
    repeats = 1 if quick else 5
    ditctl = ditctl_command()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        started = time.perf_counter()
        run_quietly([*ditctl, "init", "demo", "--model", "tiny", "--example"], Path(tmp))
        init_s = time.perf_counter() - started
        ws = Path(tmp) / "demo"
        run_quietly([*ditctl, "ingest"], ws)  # the first ingest decodes; the timed ones do not
        state = json.loads((ws / ".ditctl" / "state.json").read_text())["ingest"]
        for args in COMMANDS.values():
            rows.append({"command": f"ditctl {' '.join(args)}",
                         **timed([*ditctl, *args], ws, repeats, warmup=not quick)})
        rows.append({"command": "python -c pass",
                     **timed([sys.executable, "-c", "pass"], ws, repeats, warmup=not quick)})
        if not quick:
            rows.append({"command": f'python -c "{ML_IMPORTS}"',
                         **timed([sys.executable, "-c", ML_IMPORTS], ws, 3)})
    status_s = rows[0]["median_s"]
    return {"table": rows, "workspace": "init --model tiny --example, ingested "
            f"({state['train_count']} train + {state['val_count']} val images)",
            "init_example_s": round(init_s, 2),
            "status_vs_python_floor": round(status_s / rows[3]["median_s"], 2),
            "status_cpu_s": rows[0]["median_cpu_s"],
            "target_status_lt_1s": status_s < 1.0}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
