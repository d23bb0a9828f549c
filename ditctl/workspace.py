"""A workspace: the folder that holds one fine-tuning project.

```
myproject/
  project.toml      the user's configuration (written by `init`, then only read)
  prompts.txt       sample prompts
  .ditctl/          machine state: state.json, lock, manifest.sqlite, cache index
  data/             example data and ingest reports
  cache/            precomputed latents and text embeddings
  runs/<run>/       one folder per training run
  exports/<name>/   exported models
```
Machine-written state is replaced atomically; mutating commands hold an exclusive lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .config import Config, load_config
from .errors import LockError, WorkspaceError
from .fsutil import atomic_write_json
from .procutil import register_lock_fd, unregister_lock_fd

PROJECT_FILE = "project.toml"
STATE_DIR = ".ditctl"


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # --- locating -----------------------------------------------------------------------------
    @classmethod
    def find(cls, start: Path | None = None) -> "Workspace":
        """The workspace containing `start` (default: the current folder), searching upwards."""
        here = Path(start or Path.cwd()).resolve()
        for folder in (here, *here.parents):
            if (folder / PROJECT_FILE).is_file():
                return cls(folder)
        raise WorkspaceError(
            f"no workspace here: no {PROJECT_FILE} in {here} or any parent folder",
            hint="run `ditctl init NAME` and `cd NAME`, or pass --workspace PATH")

    # --- paths --------------------------------------------------------------------------------
    @property
    def project_file(self) -> Path:
        return self.root / PROJECT_FILE

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "lock"

    @property
    def manifest_db(self) -> Path:
        return self.state_dir / "manifest.sqlite"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    def resolve(self, path: str | Path) -> Path:
        """A path from the config: absolute as given, relative to the workspace root otherwise."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.root / path

    def cache_dir(self, config: Config) -> Path:
        return self.resolve(config.train.precomputed_data_dir or config.precompute.output_dir)

    def runs_dir(self, config: Config) -> Path:
        return self.resolve(config.train.output_dir)

    def model_path(self, config: Config) -> Path:
        if not config.model.pretrained_model_path:
            raise WorkspaceError(
                f"{self.project_file}: [model] pretrained_model_path is not set",
                hint="set it in project.toml or pass --pretrained-model-path PATH")
        return self.resolve(config.model.pretrained_model_path)

    # --- config -------------------------------------------------------------------------------
    def config(self, overrides: dict[str, Any] | None = None) -> Config:
        path = self.project_file if self.project_file.exists() else None
        return load_config(path, overrides)

    # --- state --------------------------------------------------------------------------------
    def read_state(self) -> dict[str, Any]:
        """The machine-written state (what each command last did); {} for a new workspace."""
        try:
            state = json.loads(self.state_file.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError as exc:  # not JSON, or not UTF-8
            raise WorkspaceError(f"{self.state_file} is not valid JSON ({exc})",
                                 hint=f"delete {self.state_file}; commands re-create it") from None
        if not isinstance(state, dict):
            raise WorkspaceError(f"{self.state_file} holds a JSON {type(state).__name__}, "
                                 "not the object ditctl writes",
                                 hint=f"delete {self.state_file}; commands re-create it")
        return state

    def update_state(self, section: str, values: dict[str, Any]) -> None:
        """Replace one section of the state file atomically (old state stays readable on a crash)."""
        state = self.read_state()
        state[section] = {**values, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(self.state_file, state)

    # --- lock ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the workspace's exclusive lock while a mutating command runs.

        Uses an OS file lock (`flock`), so the kernel releases it when the holder dies: a lock
        file left by a killed command is stale by construction, is reported, and is taken over.
        """
        from .console import console

        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _busy(self, _read_holder(fd)) from None
            previous = _read_holder(fd)
            if previous.get("pid"):
                console.warn(
                    f"stale lock from `{previous.get('command', '?')}` (PID {previous['pid']}, "
                    f"started {previous.get('started', '?')}) which is no longer running; "
                    "taking it over")
            _write_holder(fd, {"pid": os.getpid(), "command": command, "host": socket.gethostname(),
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
            register_lock_fd(fd)  # forked workers close their copy (procutil)
            try:
                yield
            finally:
                unregister_lock_fd(fd)
                _write_holder(fd, {})
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _busy(ws: Workspace, holder: dict[str, Any]) -> LockError:
    """The error for a held lock, naming the processes that hold it. The PID the lock file
    names may have exited while processes it started (holding the lock's inherited file) live
    on; then the live ones are named instead."""
    command, started = holder.get("command", "?"), holder.get("started", "?")
    pid = holder.get("pid")
    if isinstance(pid, int) and pid > 0 and not _alive(pid) \
            and holder.get("host", socket.gethostname()) == socket.gethostname():
        others = _processes_with_open(ws.lock_file)
        who = (f"process(es) {', '.join(map(str, others))} started by `{command}` "
               f"(PID {pid}, started {started}, no longer running) still hold its lock"
               if others else f"a process started by `{command}` (PID {pid}, no longer "
                              "running) still holds its lock")
        return LockError(f"workspace {ws.root} is busy: {who}",
                         hint="wait a few seconds for them to exit, or stop them")
    return LockError(f"workspace {ws.root} is busy: `{command}` (PID {pid or '?'}, started "
                     f"{started}) holds its lock",
                     hint="wait for it to finish, or stop that process")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _processes_with_open(path: Path) -> list[int]:
    """PIDs (of this user, on Linux) that have `path` open."""
    target = str(path.resolve())
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                found.append(int(proc.name))
        except OSError:
            continue
    return sorted(pid for pid in found if pid != os.getpid())


def _read_holder(fd: int) -> dict[str, Any]:
    """Who holds the lock, as written by its holder; {} when unreadable (a lock file torn or
    garbled must never block every command)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        holder = json.loads(raw) if raw.strip() else {}
    except ValueError:  # not JSON, or not UTF-8
        return {}
    return holder if isinstance(holder, dict) else {}


def _write_holder(fd: int, holder: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(holder).encode())
    os.fsync(fd)
