"""What a training run writes when it ends, the same for BERT and for the LLaMA with DPO.

`finish_run` is the last step of `train_bert.py` and `train_dpo.py`: the run's summary and its
pictures go to its metrics log and its W&B run, the log is copied beside the results, the
results file is written (`minilab/results.py` says what every results file holds), and the
checkpoints are released. Each script passes the fields only it has in `extra`.
"""

from __future__ import annotations

import time
from pathlib import Path

from .metrics import one_label_warning
from .results import command_line, peak_rss_mb, write_results
from .tracking import publish_log


def model_ref(model_id: str) -> str:
    """How a results file or an adapter names a model: a local one by its absolute path (usable
    from any folder), a Hub id as it is."""
    return str(Path(model_id).resolve()) if Path(model_id).exists() else model_id


def warn_one_label(fine_tuned: dict, label_names: list[str]) -> list[str]:
    """Print a WARNING when every test prediction is one label; the results file's `warnings`."""
    warning = one_label_warning(fine_tuned, label_names)
    if warning:
        print(f"WARNING: {warning}")
    return [warning] if warning else []


def wrong_examples(texts: list[str], labels: list[int], preds: list[int], label_names: list[str], limit: int = 10,
                   generated: list[str] | None = None) -> list[dict]:
    """The first `limit` misclassified test examples: text, true and predicted label (and the
    model's free-generation answer, for a generative classifier)."""
    return [{"text": texts[i], "true": label_names[y], "pred": label_names[p],
             **({"generated": generated[i]} if generated is not None else {})}
            for i, (y, p) in enumerate(zip(labels, preds)) if y != p][:limit]


def draw_pictures(tracker, folder: Path, name: str, label_names: list[str], confusion, loss_curve: tuple) -> None:
    """The run's own pictures (its training curve, its confusion matrix, DPO's rewards) on disk
    beside its results and in its W&B run. `loss_curve`: (the loss's name, (a reference value, its
    label)). A picture never costs a finished training run: a failure is one note."""
    try:
        from .plots import run_pictures  # matplotlib: imported only by a run that draws

        tracker.log_images(run_pictures(folder, name, tracker.path, label_names, confusion, *loss_curve))
    except Exception as e:  # noqa: BLE001
        print(f"note: pictures not drawn ({type(e).__name__}: {e})")


def finish_run(tracker, checkpointer, result, cfg, data, *, out: str, name: str, kind: str, model_id: str,
               zero_shot: dict, fine_tuned: dict, predictions: list[int], wrong: list[dict], warnings: list[str],
               device, dtype: str, save_dir: Path, loss_curve: tuple, summary: dict | None = None,
               split_sizes: dict | None = None, started: float | None = None, eval_seconds: dict | None = None,
               extra: dict | None = None) -> Path:
    """Close the run (rank 0 alone) and write `<out>/<task>/<name>.json`; returns its path.

    `result`, `cfg`: the loop's TrainResult and TrainConfig; `data`: the TaskData; `summary`: more
    W&B summary values; `split_sizes`: when not the data's own; `started`: the training's start
    time, for `wall_seconds`; `eval_seconds`: the script's own test evaluations ({"zero_shot": s,
    "test": s}), written with the loop's dev evaluations as `evaluation`. `extra` places a script's
    own fields after a common one, so that each results file keeps its order: {"dtype": {"bert_fast":
    True}} puts bert_fast after dtype."""
    run_dir = Path(out) / data.task
    evaluation = {"zero_shot": (eval_seconds or {}).get("zero_shot"), "dev": result.eval_seconds,
                  "test": (eval_seconds or {}).get("test")}  # None: not evaluated here (e.g. read from a cache)
    tracker.summary({"test/accuracy": fine_tuned["accuracy"], "test/macro_f1": fine_tuned["macro_f1"],
                     "zero_shot/accuracy": zero_shot["accuracy"], **(summary or {})})
    draw_pictures(tracker, run_dir / "pictures", name, data.label_names, fine_tuned["confusion"], loss_curve)
    tracker.finish()
    common = {
        "task": data.task, "name": name, "model": model_ref(model_id), "kind": kind,
        "split_sizes": split_sizes or data.sizes(), "label_names": data.label_names,
        "zero_shot": zero_shot, "fine_tuned": fine_tuned,
        "dev_best": result.best_metric, "dev_metric": cfg.metric,
        "nonfinite_steps": result.nonfinite_steps, "resumed_from_step": result.resumed_from,
        "checkpoints": {"written": result.checkpoints, "seconds": result.checkpoint_seconds},
        "stopped_by": result.stopped_by,
        "warnings": warnings,
        "train_seconds": result.train_seconds,
        **({"wall_seconds": time.time() - started} if started is not None else {}),
        "examples_per_second": result.examples_per_second,
        "evaluation": {f"{k}_seconds": v for k, v in evaluation.items() if v is not None},
        "peak_rss_mb": peak_rss_mb(),
        "device": str(device), "dtype": dtype, "seed": cfg.seed,
        "command": command_line(),
        "metrics_log": str((run_dir / f"{name}_metrics.jsonl").resolve()),  # absolute: usable from any folder
        "save_dir": str(Path(save_dir).resolve()),
        "predictions": predictions,
        "wrong_examples": wrong,
    }
    payload = {}
    for key, value in common.items():
        payload[key] = value
        payload.update((extra or {}).get(key, {}))
    publish_log(tracker.path, payload["metrics_log"])
    path = write_results(payload, name, root=out)
    checkpointer.finish()  # results and model written: a new run may replace these checkpoints
    return path
