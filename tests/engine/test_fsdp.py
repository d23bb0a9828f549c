"""[distributed] strategy = fsdp: sharded training, sharded checkpoints, resharding resume,
multi-node launch and export, on the CPU (gloo), against single-process training.

Tolerances: single-process and 2-process runs see the same global batch, but the gradient is
summed in another order (each process averages its half, FSDP's reduce-scatter averages the
halves), so losses agree to rel 1e-4 and weights after 4 AdamW steps (lr 1e-3) to 2e-5
absolute. A resume on the same number of processes is bit-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_workspace  # noqa: E402

STEPS = ["--max-steps", "4", "--learning-rate", "1e-3", "--lr-scheduler", "constant",
         "--checkpoint-every", "2", "--run-name", "r"]
LOSS_REL = 1e-4
WEIGHT_ATOL = 2e-5
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def train(ws, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "ditctl", "train", "-w", str(ws.root), *args],
                          env=ENV, capture_output=True, text=True)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(ws) -> dict[int, float]:
    """step -> loss (the last line of each step: a resumed run logs its steps again)."""
    lines = (ws.root / "runs" / "r" / "train_log.jsonl").read_text().splitlines()
    return {d["step"]: d["train/loss"] for d in map(json.loads, lines)}


def checkpoint(ws, step: int) -> Path:
    return ws.root / "runs" / "r" / "checkpoints" / f"step-{step:06d}"


def trained_weights(ws, step: int) -> dict[str, torch.Tensor]:
    """The run's denoiser at `step` as every command loads it (the one loader), fp32."""
    from ditctl.engine.loading import load_denoiser
    from ditctl.models.registry import load_family

    family = load_family(Path(ws.config().model.pretrained_model_path))
    return load_denoiser(family, checkpoint(ws, step)).state_dict()


def assert_close_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, f"max abs weight difference {worst} > {atol}"


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun's workers run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """A single-process reference and a straight 2-process fsdp run (full fine-tuning,
    4 steps, checkpoints at 2 and 4), same global batch."""
    root = tmp_path_factory.mktemp("fsdp")
    reference = make_workspace(root / "ref", tiny_model_dir, n_train=8)
    train(reference, "--train-batch-size", "4", *STEPS)
    sharded = make_workspace(root / "fsdp", tiny_model_dir, n_train=8)
    train(sharded, "--num-processes", "2", "--strategy", "fsdp", "--train-batch-size", "2",
          *STEPS)
    return root, reference, sharded


@pytest.mark.slow
def test_fsdp_full_finetune_matches_one_process(runs):
    _, reference, sharded = runs
    want, got = losses(reference), losses(sharded)
    assert sorted(got) == [1, 2, 3, 4]
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)],
                                                          rel=LOSS_REL)
    assert_close_weights(trained_weights(sharded, 4), trained_weights(reference, 4), WEIGHT_ATOL)
    # every rank wrote its own shard; the manifest lists and hashes both
    meta = json.loads((checkpoint(sharded, 4) / "checkpoint.json").read_text())
    assert meta["sharded"] == {"world_size": 2, "trains_base": True}
    shards = sorted(name for name in meta["files"] if name.startswith("shards/"))
    assert [Path(n).name.split("-model")[0] for n in shards] == ["shard-00001", "shard-00002"]
    assert not list(checkpoint(sharded, 4).rglob(".metadata"))  # DCP's pickle: never written
    # only global rank 0 logs
    assert len((sharded.root / "runs" / "r" / "train_log.jsonl").read_text().splitlines()) == 4


@pytest.mark.slow
def test_ddp_full_finetune_on_two_processes_matches_one_process(runs, tiny_model_dir):
    """The ddp counterpart (a parameter without a gradient, F-Lite's first-block value mix,
    once made DDP's second step fail)."""
    root, reference, _ = runs
    ws = make_workspace(root / "ddp2", tiny_model_dir, n_train=8)
    train(ws, "--num-processes", "2", "--train-batch-size", "2", "--max-steps", "2", *STEPS[2:])
    want, got = losses(reference), losses(ws)
    assert [got[s] for s in (1, 2)] == pytest.approx([want[s] for s in (1, 2)], rel=LOSS_REL)


@pytest.mark.slow
def test_a_damaged_or_missing_shard_is_refused_naming_it(runs, tmp_path):
    from ditctl.errors import CheckpointError
    from ditctl.runs import verify_checkpoint

    _, _, sharded = runs
    for damage in ("missing", "flipped"):
        copy = tmp_path / damage / "runs" / "r" / "checkpoints" / "step-000004"
        shutil.copytree(checkpoint(sharded, 4), copy)
        shard = copy / "shards" / "shard-00002-model-00001-of-00001.safetensors"
        if damage == "missing":
            shard.unlink()
        else:
            data = bytearray(shard.read_bytes())
            data[-1] ^= 0xFF
            shard.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="shards/shard-00002"):
            verify_checkpoint(copy)


@pytest.mark.slow
def test_kill_9_then_resume_on_two_is_bit_identical(runs, tiny_model_dir):
    root, _, straight = runs
    ws = make_workspace(root / "killed", tiny_model_dir, n_train=8)
    args = ["train", "-w", str(ws.root), "--num-processes", "2", "--strategy", "fsdp",
            "--train-batch-size", "2", *STEPS]
    args[args.index("--max-steps") + 1] = "1000"  # constant lr: the length changes nothing
    proc = subprocess.Popen([sys.executable, "-m", "ditctl", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (checkpoint(ws, 2) / "checkpoint.json").is_file():
        time.sleep(0.1)
    for pid in [*reversed(descendants(proc.pid)), proc.pid]:  # kill -9, no clean stop
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    assert (checkpoint(ws, 2) / "checkpoint.json").is_file()
    assert not (checkpoint(ws, 1000) / "checkpoint.json").exists()
    train(ws, "--num-processes", "2", "--strategy", "fsdp", "--train-batch-size", "2",
          *STEPS[:-2], "--resume", "2", "--run", "r")
    want, got = losses(straight), losses(ws)
    assert [got[s] for s in (3, 4)] == [want[s] for s in (3, 4)]  # exactly
    a, b = trained_weights(ws, 4), trained_weights(straight, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_on_one_process_reshards(runs):
    root, _, straight = runs
    copy = root / "one"
    shutil.copytree(straight.root, copy)
    shutil.rmtree(copy / "runs" / "r" / "checkpoints" / "step-000004")
    from ditctl.workspace import Workspace

    ws = Workspace(copy)
    train(ws, "--strategy", "fsdp", "--train-batch-size", "4", *STEPS[:-2], "--resume", "2",
          "--run", "r")
    want, got = losses(straight), losses(ws)
    assert [got[s] for s in (3, 4)] == pytest.approx([want[s] for s in (3, 4)], rel=LOSS_REL)
    assert_close_weights(trained_weights(ws, 4), trained_weights(straight, 4), WEIGHT_ATOL)
    assert json.loads((checkpoint(ws, 4) / "checkpoint.json").read_text())["sharded"][
        "world_size"] == 1


@pytest.mark.slow
def test_export_of_an_fsdp_checkpoint_passes_parity_and_loads_back(runs):
    _, _, sharded = runs
    done = subprocess.run([sys.executable, "-m", "ditctl", "export", "-w", str(sharded.root),
                           "--run", "r", "--dtype", "fp32"], env=ENV, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parity passed" in done.stdout
    export = next((sharded.root / "exports").iterdir())
    from ditctl.models.registry import load_family

    exported = load_family(export).load_denoiser(torch.float32).state_dict()
    trained = trained_weights(sharded, 4)
    assert all(torch.equal(exported[k], trained[k]) for k in trained)


@pytest.mark.slow
@pytest.mark.parametrize("lora_type", ["lora", "dora", "lokr"])
def test_lora_on_a_sharded_base_over_two_nodes_matches_one_process(tmp_path, tiny_model_dir,
                                                                    lora_type):
    """Two "nodes" on 127.0.0.1 (one process each, --nnodes 2) train LoRA (and DoRA, which
    reads the sharded base weight, and LoKr) on an FSDP-sharded frozen base with gradient
    accumulation and checkpoint; the result equals single-process training at the same
    global batch."""
    lora = {"use_lora": True, "train_only_lora": True, "lora_rank": 4, "lora_type": lora_type}
    reference = make_workspace(tmp_path / "ref", tiny_model_dir, n_train=8, lora=lora)
    train(reference, "--train-batch-size", "4", *STEPS)
    ws = make_workspace(tmp_path / "nodes", tiny_model_dir, n_train=8, lora=lora)
    from ditctl.cli.launch import _free_port

    # 1 sample x 2 micro-batches x 2 processes = the reference's 4: also FSDP's no-sync
    common = ["--strategy", "fsdp", "--train-batch-size", "1", "--gradient-accumulation-steps",
              "2", "--nnodes", "2",
              "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *STEPS]
    nodes = [subprocess.Popen([sys.executable, "-m", "ditctl", "train", "-w", str(ws.root),
                               *common, "--node-rank", str(rank)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for node in nodes:
        out, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    want, got = losses(reference), losses(ws)
    assert [got[s] for s in (1, 2, 3, 4)] == pytest.approx([want[s] for s in (1, 2, 3, 4)],
                                                           rel=LOSS_REL)
    meta = json.loads((checkpoint(ws, 4) / "checkpoint.json").read_text())
    assert meta["sharded"] == {"world_size": 2, "trains_base": False}
    assert "adapter_config.json" in meta["files"]
    assert_close_weights(trained_weights(ws, 4), trained_weights(reference, 4), WEIGHT_ATOL)


MEASURE = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from ditctl.config import build_config
    from ditctl.engine.sharding import local_tensor, shard_denoiser
    from ditctl.models.registry import load_family

    def held(tensors):  # bytes of the distinct storages behind this process's local tensors
        storages = {}
        for t in tensors:
            storage = local_tensor(t).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def measure(sharded):
        family = load_family(sys.argv[2])
        torch.manual_seed(0)
        model = family.load_denoiser()
        if sharded:
            shard_denoiser(model, build_config({"distributed": {"strategy": "fsdp"}}),
                           torch.device("cpu"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        family.predict(model, *family.parity_inputs(model)).square().mean().backward()
        optimizer.step()
        params = list(model.parameters())
        return {"params": held(params),
                "grads": held(p.grad for p in params if p.grad is not None),
                "optimizer": held(v for s in optimizer.state.values() for v in s.values()
                                  if v.dim() > 0)}

    dist.init_process_group("gloo")
    whole = measure(False)  # what one process holds alone (ddp, or a single process)
    with open(f"{sys.argv[1]}.{dist.get_rank()}", "w") as fh:
        json.dump({"whole": whole, "fsdp": measure(True)}, fh)
""")


@pytest.mark.slow
def test_fsdp_halves_per_process_parameter_gradient_and_optimiser_bytes(tmp_path,
                                                                        tiny_model_dir):
    from ditctl.cli.launch import _free_port

    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(_free_port()), str(script), str(tmp_path / "bytes"),
                    str(tiny_model_dir)],
                   env=ENV, check=True, capture_output=True)
    for rank in (0, 1):
        measured = json.loads((tmp_path / f"bytes.{rank}").read_text())
        for kind in ("params", "grads", "optimizer"):
            ratio = measured["fsdp"][kind] / measured["whole"][kind]
            assert 0.45 <= ratio <= 0.56, (rank, kind, ratio)  # half, plus FSDP's padding


def test_fsdp_plan_splits_state_across_processes(tmp_path, tiny_model_dir, cli, monkeypatch):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=8)
    monkeypatch.chdir(ws.root)

    def plan(*args):
        return json.loads(cli("train", "--dry-run", "--json", *args).stdout)

    ddp = plan("--num-processes", "2")
    fsdp = plan("--num-processes", "2", "--strategy", "fsdp")
    offload = plan("--num-processes", "2", "--strategy", "fsdp", "--cpu-offload")
    assert ddp["strategy"] == "ddp" and fsdp["shards"] == 2
    mb, mf = ddp["memory_estimate_bytes"], fsdp["memory_estimate_bytes"]
    for key in ("trainable_weights", "gradients", "optimizer"):
        assert mf[key] == -(-mb[key] // 2)
    assert mf["gathered_weights"] > 0 and mf["activations"] == mb["activations"]
    mo = offload["memory_estimate_bytes"]
    assert mo["optimizer"] == 0 and mo["host_offloaded"] == sum(
        mf[k] for k in ("base_weights", "trainable_weights", "gradients", "optimizer"))
    assert not (ws.root / "runs").exists()


@pytest.mark.parametrize("flags, message", [
    (["--cpu-offload"], "cpu_offload offloads FSDP shards"),
    (["--nnodes", "2"], "nnodes > 1 needs master_port"),
    (["--nnodes", "2", "--node-rank", "2", "--master-port", "29500"], "node_rank = 2 must be"),
    (["--strategy", "fsdp", "--lora", "--base-precision", "nf4"], "FSDP cannot shard"),
    (["--strategy", "fsdp", "--use-8bit-adam"], "cannot step sharded"),
])
def test_fsdp_settings_that_cannot_work_are_refused(tmp_path, tiny_model_dir, cli, monkeypatch,
                                                    flags, message):
    ws = make_workspace(tmp_path / "w", tiny_model_dir, n_train=4)
    monkeypatch.chdir(ws.root)
    result = cli("train", "--dry-run", *flags)
    assert result.exit_code == 1 and message in result.stderr
