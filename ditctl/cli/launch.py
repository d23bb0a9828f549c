"""`ditctl train --num-processes N [--nnodes M --node-rank R ...]`: start N training processes
on this machine (one of M machines).

The parent holds the workspace lock and starts `torch.distributed.run` with the same command
line; each child then runs the ordinary single-command path with accelerate's process group
(NCCL on GPUs, gloo on CPUs). The run name is fixed here so every process writes to one run.

The lock lives exactly as long as the training: nothing may train without it. So the agent
(`torch.distributed.run`) is killed by the kernel when this parent dies, however it dies
(PR_SET_PDEATHSIG, set before it starts), and each training process likewise when the agent
dies (`worker_lifeline`). SIGTERM and Ctrl-C to this parent are passed on instead: the
processes save a resume checkpoint and stop, and the parent exits with EXIT_INTERRUPTED.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Any

import typer

from ..config import Config
from ..console import console
from ..errors import EXIT_INTERRUPTED, ConfigError, TrainingError
from ..procutil import die_with_parent
from ..runs import resolve_checkpoint
from ..workspace import Workspace

CHILD_ENV = "DITCTL_LAUNCHED"
LAUNCHER_ENV = "DITCTL_LAUNCHER_PID"  # the parent holding the lock, for worker_lifeline


def worker_lifeline() -> None:
    """In a launched training process: die with the agent that started it, and at once if the
    launching parent (the lock holder) is already gone."""
    die_with_parent(signal.SIGKILL)
    launcher = os.environ.get(LAUNCHER_ENV, "")
    if launcher.isdigit():
        try:
            os.kill(int(launcher), 0)
        except ProcessLookupError:
            os.kill(os.getpid(), signal.SIGKILL)
        except PermissionError:
            pass


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
    """Start the child processes and wait for them; False when this process should train.

    Multi-node ([distributed] nnodes > 1): run the same command on every node with its
    --node-rank; the nodes meet at --master-addr:--master-port (node 0). The workspace (and
    so the run folder) must be on a filesystem every node sees; node 0 holds its lock."""
    dist = config.distributed
    if (config.train.num_processes <= 1 and dist.nnodes <= 1) or os.environ.get(CHILD_ENV) \
            or "WORLD_SIZE" in os.environ or dry_run:  # a plan needs no processes started
        return False
    overrides = {k: v for k, v in overrides.items() if k != "train.num_processes"}
    if not resume and not dry_run and not config.train.run_name:
        if dist.nnodes > 1:  # every node must write into the same run
            raise ConfigError("multi-node training needs --run-name (the same on every node)",
                              hint="add --run-name NAME to the command on every node")
        overrides["train.run_name"] = time.strftime("run-%Y%m%d-%H%M%S")
    port = dist.master_port if dist.master_port is not None else _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
               str(config.train.num_processes), "--nnodes", str(dist.nnodes), "--node_rank",
               str(dist.node_rank), "--master_addr", dist.master_addr, "--master_port",
               str(port), "-m", "ditctl", "train", "--workspace", str(ws.root),
               *_flag_args(overrides)]
    if resume:
        # resolved here, so every process (and node) reads the same checkpoint; and the children
        # get no `--run`, which torch.distributed.run's parser takes for its own `--run-path`
        checkpoint = resolve_checkpoint(ws.runs_dir(config), resume,
                                        run=run or config.train.run_name)
        command += ["--resume", str(checkpoint)]
    elif run:
        raise ConfigError("--run picks the run to resume; it needs --resume",
                          hint="name a new run with --run-name, or add --resume latest")
    if force:
        command.append("--force")
    if dry_run:
        command.append("--dry-run")
    env = {**os.environ, CHILD_ENV: "1", LAUNCHER_ENV: str(os.getpid()),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    nodes = f" on node {dist.node_rank} of {dist.nnodes}" if dist.nnodes > 1 else ""
    console.info(f"starting {config.train.num_processes} training processes{nodes}")
    with ws.lock("train") if dist.node_rank == 0 else nullcontext():
        code, stopped = _run_agent(command, env)
    if stopped and code != 0:  # (0: the run finished before the signal took effect)
        console.print("stopped; next: ditctl train --resume latest"
                      + (f" --run {overrides['train.run_name']}"
                         if overrides.get("train.run_name") else ""))
        raise typer.Exit(EXIT_INTERRUPTED)
    if code != 0:
        raise TrainingError(f"a training process exited with code {code}",
                            hint="see its output above; resume with `ditctl train --resume latest`")
    return True


def _run_agent(command: list[str], env: dict[str, str]) -> tuple[int, bool]:
    """Run the agent until it exits; (its exit code, whether we were asked to stop). SIGTERM
    and SIGINT are passed on as SIGTERM (the agent sends it to every process, which saves a
    resume checkpoint); a second Ctrl-C kills the agent and so every process."""
    agent = subprocess.Popen(command, env=env,
                             preexec_fn=functools.partial(die_with_parent, signal.SIGKILL,
                                                          os.getpid()))
    requests: list[int] = []

    def forward(signum, frame):
        requests.append(signum)
        if len(requests) > 1 and signum == signal.SIGINT:
            agent.kill()
        elif len(requests) == 1:
            agent.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return agent.wait(), bool(requests)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
