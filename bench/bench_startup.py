"""Start-up time of the commands that do little: `status`, `--help`, `ingest` with nothing to do.

    python -m bench startup [--quick]

Builds a workspace as the demo does (`ditctl init --model tiny --example`, then `ditctl
ingest`), then runs each command the way a user does: the `ditctl` script in a fresh process,
output discarded, `repeats` times (5; --quick: 1) after one warm-up run (page cache), wall-clock
seconds. Side by side in the same run:
  python_floor   `python -c pass`: the interpreter's own start-up, the floor for any command
  ml_imports     `python -c "import torch, diffusers, transformers, peft"`: what `status` used
                 to import before its first line (not measured with --quick)
Target: `ditctl status` under 1 s (median). tests/cli/test_startup.py checks, without timing,
that these commands import none of the ML stack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Timing, time_repeats  # noqa: E402

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


def timed(argv: list[str], cwd: Path, repeats: int) -> Timing:
    return time_repeats(lambda: run_quietly(argv, cwd), repeats=repeats, warmup=1)


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
        for name, args in COMMANDS.items():
            timing = timed([*ditctl, *args], ws, repeats)
            rows.append({"command": f"ditctl {' '.join(args)}", "median_s": round(timing.median, 3),
                         "best_s": round(timing.best, 3), "runs": len(timing.values)})
        floor = timed([sys.executable, "-c", "pass"], ws, repeats)
        rows.append({"command": "python -c pass", "median_s": round(floor.median, 3),
                     "best_s": round(floor.best, 3), "runs": len(floor.values)})
        if not quick:
            ml = timed([sys.executable, "-c", ML_IMPORTS], ws, 3)
            rows.append({"command": f'python -c "{ML_IMPORTS}"', "median_s": round(ml.median, 3),
                         "best_s": round(ml.best, 3), "runs": len(ml.values)})
    status_s = rows[0]["median_s"]
    return {"table": rows, "workspace": "init --model tiny --example, ingested "
            f"({state['train_count']} train + {state['val_count']} val images)",
            "init_example_s": round(init_s, 2),
            "status_vs_python_floor": round(status_s / rows[3]["median_s"], 2),
            "target_status_lt_1s": status_s < 1.0}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
