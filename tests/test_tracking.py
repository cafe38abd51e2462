"""Metrics go to a JSONL file always, and to an offline W&B run when wandb is on."""

import json

import pytest

from minilab.tracking import Tracker


def test_jsonl_records_and_disabled_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    t = Tracker(tmp_path / "m.jsonl", config={"lr": 0.1})
    t.log({"loss": 1.5}, step=1)
    t.log({"accuracy": 0.5}, step=1, kind="eval")
    t.summary({"test/accuracy": 0.75})
    t.finish()
    assert t.run is None
    recs = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["config", "train", "eval", "summary"]
    assert recs[0]["config"] == {"lr": 0.1} and recs[1]["loss"] == 1.5 and recs[3]["test/accuracy"] == 0.75


def test_offline_wandb_run_holds_curves_summary_and_pictures(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = Tracker(tmp_path / "m.jsonl", run_name="unit", config={"lr": 0.1})
    assert t.run is not None and t.mode == "offline"
    for step in range(1, 4):
        t.log({"loss": 1.0 / step}, step=step)
    fig = plt.figure()
    plt.plot([1, 2, 3])
    fig.savefig(tmp_path / "p.png")
    t.log_images({"curve": tmp_path / "p.png"})
    t.summary({"test/accuracy": 0.9})
    t.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert list((runs[0] / "files" / "media" / "images").glob("curve_*.png"))
