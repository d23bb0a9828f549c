"""A workspace wherever people put one: folder names with the characters a SQLite URI gives a
meaning to (`?` ends the path, `#` starts a fragment, `%` an escape), spaces and non-ASCII.
Every database ditctl opens read-only (the manifest, the cache index, ingest's staging file)
is opened through such a URI."""

from __future__ import annotations

import json

from tests.conftest import make_workspace

LORA = {"use_lora": True, "train_only_lora": True, "lora_rank": 2, "lora_alpha": 2}


def test_the_whole_chain_runs_in_a_folder_named_with_uri_characters(tmp_path, tiny_model_dir,
                                                                    cli, monkeypatch):
    from ditctl.data.sample_table import SampleTable
    from ditctl.train import run_training

    ws = make_workspace(tmp_path / "run #1? 100% sûr", tiny_model_dir, n_train=3, n_val=1,
                        lora=LORA, train={"max_steps": 1, "sample_every": 0})
    monkeypatch.chdir(ws.root)
    assert cli("ingest").exit_code == 0
    assert cli("ingest").exit_code == 0  # re-ingest reads the previous manifest
    assert [row.source for row in SampleTable.read(ws.manifest_db, "train")] == [
        "line 2", "line 3", "line 4"]
    assert cli("precompute").exit_code == 0  # its decoding workers read the manifest too
    again = json.loads(cli("precompute", "--verify", "--json").stdout)
    assert again["added"] == 0 and again["verified"] == again["entries"] and not again["bad"]
    state_file = ws.root / ".ditctl" / "state.json"
    state = json.loads(state_file.read_text())
    del state["precompute"]  # so that status can only count the entries in the index
    state_file.write_text(json.dumps(state))
    status = json.loads(cli("status", "--json").stdout)
    assert status["cache"]["precompute"] == {"entries": again["entries"]}
    assert run_training(ws, ws.config({"eval.holdout_fraction": 0.0})).result.steps == 1
