"""Start-up: `status`, `--help`, `ingest` with nothing to do and the usage-error paths of every
command never import the ML stack (torch, diffusers, transformers, peft, accelerate,
bitsandbytes), which costs seconds before the first line is printed.

The cases run one after another in one fresh interpreter, as the `ditctl` script runs a
command, and after each one the interpreter reports which of those modules are loaded:
deterministic, unlike a timing (bench/bench_startup.py measures the time). Once a case imports
the stack every later case shows it too, so the first case that does is the culprit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_workspace

ML_STACK = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes")

# Reads [[cwd, [args...]], ...] from stdin; prints one JSON line per case.
PROBE = """
import contextlib, io, json, os, sys
from ditctl.cli.app import app
for cwd, args in json.load(sys.stdin):
    os.chdir(cwd)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            app(args, prog_name="ditctl")
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
    print(json.dumps({"args": args, "exit": code, "ml_stack": loaded, "output": out.getvalue()}))
""" % (ML_STACK,)


def probe(cases: list[tuple[Path, list[str]]]) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          input=json.dumps([[str(cwd), args] for cwd, args in cases]), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_status_help_ingest_and_usage_errors_import_no_ml_stack(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", tiny_model_dir, n_train=3, n_val=1)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    broken = tmp_path / "broken"  # a workspace whose project.toml has a typo in a key
    broken.mkdir()
    (broken / "project.toml").write_text("[train]\nlearning_rat = 0.001\n")
    first_ingest = probe([(ws.root, ["ingest"])])[0]
    assert first_ingest["exit"] == 0, first_ingest["output"]

    commands = [["train", "--lora"], ["precompute"], ["sample"], ["eval"],
                ["export", "--merge-lora"], ["ingest"], ["status"]]
    # (folder, arguments, what the output must say; None: exit 0)
    cases = [(ws.root, ["status"], None), (ws.root, ["status", "--json"], None),
             (ws.root, ["status", "--config"], None), (ws.root, ["--help"], None),
             (ws.root, ["train", "--help"], None),
             (ws.root, ["ingest"], "decoded 0 file(s), reused 4"),  # nothing to do
             (tmp_path, ["init", "fresh", "--model", "tiny"], "created"),  # copies a folder
             *[(outside, args, "no workspace here") for args in commands],
             *[(broken, args, "learning_rat") for args in commands]]
    # the control, last: a command that gets as far as its work does import the stack (here
    # export, which then finds no run to export), so the probe can see it
    cases.append((ws.root, ["export"], "no training runs"))
    results = probe([(cwd, args) for cwd, args, _ in cases])
    assert [r["args"] for r in results] == [args for _, args, _ in cases]
    control = results.pop()
    assert control["exit"] == 1 and "no training runs" in control["output"], control["output"]
    assert "torch" in control["ml_stack"]

    for (cwd, args, says), result in zip(cases, results):
        where = f"`ditctl {' '.join(args)}` in {cwd.name}"
        assert result["ml_stack"] == [], f"{where} imported {result['ml_stack']}"
        failing = says in ("no workspace here", "learning_rat")
        assert result["exit"] == (1 if failing else 0), (where, result["output"])
        assert says is None or says in result["output"], (where, result["output"])
