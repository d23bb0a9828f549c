"""`ditctl train --num-processes N`: start N data-parallel training processes on this machine.

The parent holds the workspace lock and starts `torch.distributed.run` with the same command
line; each child then runs the ordinary single-command path with accelerate's process group
(NCCL on GPUs, gloo on CPUs). The run name is fixed here so every process writes to one run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Any

from ..config import Config
from ..console import console
from ..errors import TrainingError
from ..workspace import Workspace

CHILD_ENV = "DITCTL_LAUNCHED"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flag_args(overrides: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for dotted, value in overrides.items():
        key = dotted.split(".", 1)[1].replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, (list, tuple)):
            args += [f"--{key}", ",".join(map(str, value))]
        else:
            args += [f"--{key}", str(value)]
    return args


def launch_processes(ws: Workspace, config: Config, overrides: dict[str, Any], *,
                     resume: str | None, run: str | None = None, force: bool,
                     dry_run: bool) -> bool:
    """Start the child processes and wait for them; False when this process should train."""
    if config.train.num_processes <= 1 or os.environ.get(CHILD_ENV) or "WORLD_SIZE" in os.environ:
        return False
    overrides = {k: v for k, v in overrides.items() if k != "train.num_processes"}
    if not resume and not dry_run and not config.train.run_name:
        overrides["train.run_name"] = time.strftime("run-%Y%m%d-%H%M%S")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
               str(config.train.num_processes), "--master_addr", "127.0.0.1", "--master_port",
               str(_free_port()), "-m", "ditctl", "train", "--workspace", str(ws.root),
               *_flag_args(overrides)]
    if resume:
        command += ["--resume", resume]
    if run:
        command += ["--run", run]
    if force:
        command.append("--force")
    if dry_run:
        command.append("--dry-run")
    env = {**os.environ, CHILD_ENV: "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    console.info(f"starting {config.train.num_processes} training processes")
    with ws.lock("train"):
        code = subprocess.call(command, env=env)
    if code != 0:
        raise TrainingError(f"a training process exited with code {code}",
                            hint="see its output above; resume with `ditctl train --resume latest`")
    return True
