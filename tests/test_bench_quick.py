"""The benchmark harness: `python -m bench --quick` end to end, its bookkeeping, and the
GPU check's CPU smoke mode. Timings are not checked (CI machines vary); structure is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from bench.run import BENCHMARKS, parse_args, run_one  # noqa: E402

HANG_GUARD_S = 1800  # a hung run fails instead of blocking the suite; the time is not checked


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_quick_run_records_every_benchmark_and_leaves_the_real_results_alone(tmp_path):
    real_results = REPO / "bench" / "RESULTS.md"
    before = real_results.read_bytes() if real_results.exists() else None
    results_md, report_json = tmp_path / "RESULTS.md", tmp_path / "report.json"
    results_md.write_text("# kept\n\nearlier block\n")

    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--results", str(results_md),
                           "--json", str(report_json)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=HANG_GUARD_S)

    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_json.read_text())
    assert report["quick"] is True
    assert list(report["benchmarks"]) == list(BENCHMARKS)
    statuses = {name: outcome["status"] for name, outcome in report["benchmarks"].items()}
    assert statuses == dict.fromkeys(BENCHMARKS, "ok")
    results = {n: o["results"] for n, o in report["benchmarks"].items()}

    startup = results["startup"]
    assert [row["command"] for row in startup["table"]] == [
        "ditctl status", "ditctl --help", "ditctl ingest", "python -c pass"]
    assert all(row["median_s"] > 0 for row in startup["table"])
    assert all(row["median_cpu_s"] > 0 for row in startup["table"][:3])
    assert "144 train + 8 val images" in startup["workspace"]
    training = results["training"]
    assert [row["precision"] for row in training["table"]] == ["fp32", "bf16 autocast"]
    assert all(row["engine_step_s"] > 0 and row["plain_step_s"] > 0 and row["pairs"] == 2
               for row in training["table"])
    assert training["parameters"] == common.dit_parameters(common.TINY_FLITE)
    memory = results["memory"]
    assert [len(rows) for rows in memory["tables"].values()] == [4, 4, 2]
    assert {k for k in memory if k.startswith("target_")} == {
        "target_lora_le_40pct_of_full", "target_8bit_state_le_30pct",
        "target_checkpointing_cuts_ge_40pct", "target_cache_saves_ge_90pct_of_encoders",
        "target_cache_steps_faster"}
    # 8-bit AdamW keeps ~2 bytes per parameter of state, AdamW exactly 8 (two fp32 moments)
    assert memory["optimiser_and_lora"]["adamw_state_bytes_per_trainable_param"] == 8.0
    assert memory["optimiser_and_lora"]["adamw8bit_state_bytes_per_trainable_param"] < 3.0
    scaling = results["scaling"]
    resolution, rank, ckpt = scaling["tables"].values()
    assert [row["tokens"] for row in resolution] == [32, 80, 272]
    assert [row["checkpointing"] for row in ckpt] == ["off", "on"]
    assert [row["lora_rank"] for row in rank] == [4, 16, 64]
    assert [row["trainable_params"] for row in rank] == [6400, 25600, 102400]

    text = results_md.read_text()
    assert text.startswith("# kept\n\nearlier block\n")
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert [h.split(" · ")[0][3:] for h in headings] == list(BENCHMARKS)
    assert all(h.endswith("quick (smoke run)") for h in headings)
    machine = [line for line in text.splitlines() if line.startswith("Machine: ")]
    assert len(machine) == len(BENCHMARKS)
    assert all(" cores " in m and " torch " in m and " device " in m for m in machine)
    after = real_results.read_bytes() if real_results.exists() else None
    assert after == before


@pytest.mark.slow
def test_gpu_check_cpu_smoke_writes_its_json(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu-smoke",
                           "--no-compile"], cwd=tmp_path, env={**_env(), "OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {r["config"]: r for r in report["results"]}
    measured = ["full", "full + ckpt", "LoRA r64", "LoRA r64 + ckpt", "LoRA r64, half size",
                "full, half size"]
    assert sorted(name for name, r in rows.items() if r["status"] == "ok") == sorted(measured)
    assert all(rows[name]["step_s"] > 0 and rows[name]["mfu_pct"] > 0 for name in measured)
    assert rows["full, half size"]["px"] * 2 == rows["full"]["px"]
    # the GPU-only attention backends are reported as such on a CPU, not measured
    assert {name for name, r in rows.items() if r["status"].startswith("unavailable")} == {
        f"LoRA r64, attention {b}" for b in ("flash", "flash3", "sage", "xformers", "flex")} | {
        "LoRA r64, attention flash, half size"}
    assert report["parameters"] == common.dit_parameters(common.DitShape(64, 2, 4, 64))
    assert "| full + ckpt | sdpa | 64 | ok |" in done.stdout


def test_flop_formula_matches_a_hand_count():
    shape = common.DitShape(hidden=8, depth=2, heads=2, text_dim=4)
    # 4x4 latent -> 2x2 patches + 16 registers = 20 tokens; 3 text tokens; batch 2
    per_token = 2 * (6 * 64 + 8 * 64)  # qkv+proj+q+proj (6H²) and the MLP (8H²), 2 blocks
    expected = 2 * (6 * per_token * 20 + 6 * 2 * (2 * 8 * 4) * 3
                    + 12 * 2 * 20 * 20 * 8 + 12 * 2 * 20 * 3 * 8)
    assert common.training_flops(shape, (4, 4), batch=2, text_tokens=3) == expected


def test_parameter_counts_of_the_documented_shapes():
    assert common.dit_parameters(common.RELEASED_FLITE) == 9_785_401_448
    assert common.dit_parameters(common.SMALL_FLITE) == 94_553_158


def test_results_are_appended_after_the_existing_text(tmp_path):
    path = tmp_path / "RESULTS.md"
    stamp = {"date": "2025-01-02 03:04", "cpu": "Test CPU", "cores": 2, "torch_threads": 2,
             "torch": "2.x", "device": "cpu", "python": "3.11", "ditctl": "0.1.0",
             "commit": "abc1234", "load_avg_1m": 0.5}
    results = {"table": [{"config": "a", "step_s": 0.5}, {"config": "b", "step_s": 1.25}],
               "nested": {"ratio": 0.123456, "ok": True}}
    common.append_results(path, common.results_block("demo", False, stamp, results, 12.3))
    first = path.read_text()
    assert first.startswith(common.RESULTS_HEADER)
    common.append_results(path, common.results_block("demo", True, stamp, {"x": 1}, 1.0))
    second = path.read_text()
    assert second.startswith(first)
    assert "## demo · 2025-01-02 03:04 · full\n" in first
    assert ("Machine: Test CPU · 2 cores (2 torch threads) · torch 2.x · device cpu · "
            "Python 3.11 · ditctl 0.1.0 @ abc1234 · load avg 0.5 · took 12 s") in first
    assert "| config | step_s |\n| ------ | ------ |\n| a      | 0.5    |\n| b      | 1.25   |" \
        in first
    assert "| nested.ratio | 0.1235 |" in first and "| nested.ok    | yes    |" in first
    assert second.count("## demo · ") == 2 and "· quick (smoke run)\n" in second


def test_peak_rss_can_be_reset_to_the_current_rss():
    blob = bytearray(64 * 2**20)
    blob[::4096] = b"\x01" * len(blob[::4096])  # touch every page
    del blob
    assert common.peak_rss_bytes() - common.rss_bytes() >= 60 * 2**20
    common.reset_peak_rss()
    assert common.peak_rss_bytes() - common.rss_bytes() < 8 * 2**20


def test_a_missing_benchmark_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(BENCHMARKS, "ghost", ("bench.bench_does_not_exist", "nothing"))
    outcome = run_one("ghost", quick=True)
    assert outcome == {"status": "missing",
                       "error": "bench.bench_does_not_exist does not exist yet"}


def test_unknown_benchmark_names_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["trainig"])
    assert "unknown benchmark(s) trainig" in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_precision_splits_each_step_into_its_parts():
    from bench.bench_cpu_precision import CATEGORIES, category

    assert [category(n) for n in ("aten::mm", "aten::addmm", "aten::_to_copy",
                                  "aten::_scaled_dot_product_flash_attention_for_cpu",
                                  "aten::rms_norm")] == ["matmul", "matmul", "casts",
                                                         "attention", "other"]
    outcome = run_one("cpu_precision", quick=True)
    assert outcome["status"] == "ok", outcome.get("error")
    tables = outcome["results"]["tables"]
    assert list(tables) == ["full (s per step)", "lora (s per step)"]
    for rows in tables.values():
        parts = {row["part"]: row for row in rows}
        assert list(parts) == [*CATEGORIES, "total", "wall"]
        for precision in ("fp32", "bf16_autocast"):
            # the parts add up to the total; the profiled CPU time fits in the wall time
            assert sum(parts[c][precision] for c in CATEGORIES) == \
                pytest.approx(parts["total"][precision], abs=0.01)
            assert parts["matmul"][precision] > 0 and parts["optimizer"][precision] > 0


def test_lora_variants_set_reads_one_key_for_one_kind():
    from bench.bench_lora_variants import parse_set

    assert parse_set("lokr:train.learning_rate=8e-3") == ("lokr", "train.learning_rate", 8e-3)
    assert parse_set("dora:lora.lora_rank = 32") == ("dora", "lora.lora_rank", 32)
    for bad in ("lokra:train.learning_rate=1", "lokr:learning_rate=1", "lokr:train.x="):
        with pytest.raises(ValueError, match="kind:section.key=value"):
            parse_set(bad)
