"""The reference row: TF-IDF + logistic regression, on the CPU, in seconds.

Every fine-tuned model in the lab is compared with this. It reads top to bottom like a notebook:
load the task, turn texts into TF-IDF vectors (word 1- and 2-grams, sublinear tf), fit one logistic
regression per value of C on train, keep the C that does best on dev, and report that model once
on test, with a 95% interval, since small test splits make every accuracy a noisy estimate.

    python baseline.py                          # steam, from $MINILAB_DATA/steam or the Hub
    python baseline.py --data ../shared/data/sst2 --out results

Writes results/<task>/baseline.json. Each step is a function of the `Run` it fills in (a notebook
can run them one at a time: `run = load_data(parse_args([])); check_save_dir(run); features(run)`).
"""

import argparse
import importlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minilab import results
from minilab.cli import nonneg_int, positive_float, positive_int, run_main, seed_int
from minilab.data import TaskData, add_data_args, load_task_from_args
from minilab.files import check_output_folder
from minilab.metrics import evaluate_predictions
from minilab.results import command_line, fmt_score, peak_rss_mb
from minilab.run_outputs import wrong_examples
from minilab.tfidf import LogisticRegression, TfidfVectorizer, fit_logistic_regression, save_baseline

GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # C: inverse L2 strength; large C = trust the data more


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.add_argument("--seed", type=seed_int, default=0, help="recorded for the results file (L-BFGS from zeros is deterministic)")
    p.add_argument("--out", default="results", help="results root: writes <out>/<task>/baseline.json")
    p.add_argument("--min-df", type=positive_int, default=1, help="keep terms seen in at least this many training texts (>= 1)")
    p.add_argument("--grid", type=positive_float, nargs="+", default=list(GRID), help="values of C (> 0) to try on dev")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="CPU threads for torch; 1 is fastest for a problem this small (more threads mostly wait on each other)")
    p.add_argument("--save-dir", default=None, help="where the fitted model goes, for minilab.predict (default: runs/<task>/baseline)")
    p.add_argument("--show-wrong", type=nonneg_int, default=5, help="how many misclassified test texts to keep in the results (0: none)")
    return p.parse_args(argv)


@dataclass
class Run:
    """What the steps share. `load_data` makes it; each later step reads what the earlier ones set
    and adds its own fields (listed below by step), so that a notebook can run the steps one cell
    at a time and look at any of them in between."""

    args: argparse.Namespace
    data: TaskData  # 1. load_data
    save_dir: Path | None = None  # check_save_dir
    vec: TfidfVectorizer | None = None  # 2. features: (N, V) sparse rows per split
    x_train: torch.Tensor | None = None
    x_dev: torch.Tensor | None = None
    x_test: torch.Tensor | None = None
    vec_seconds: float = 0.0
    grid: list = field(default_factory=list)  # 3. pick_c: one row per C (dev scores, seconds, L-BFGS info)
    best: dict | None = None  # the row picked
    C: float = 0.0
    model: LogisticRegression | None = None
    fit_seconds: float = 0.0
    search_seconds: float = 0.0
    majority: int = 0  # 4. evaluate_on_test: the most common training label
    zero_shot: dict | None = None
    dev: dict | None = None
    pred: list = field(default_factory=list)
    test: dict | None = None
    wrong: list = field(default_factory=list)
    payload: dict = field(default_factory=dict)  # 5. write_results: what the results file holds


def load_data(args) -> Run:
    """1. Data: three splits of (text, label), checked once by the shared loader."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    return Run(args, load_task_from_args(args))


def check_save_dir(run: Run) -> None:
    """Checked now, before any fit: a folder holding files minilab did not write, the data or the results is refused."""
    run.save_dir = Path(run.args.save_dir or f"runs/{run.data.task}/baseline")
    check_output_folder(run.save_dir, [run.data.source], outputs=[run.args.out])


def features(run: Run) -> None:
    """2. Features: the vocabulary and idf come from train only; dev and test are just mapped onto them."""
    t0 = time.perf_counter()
    run.vec = TfidfVectorizer(ngram_range=(1, 2), min_df=run.args.min_df, sublinear_tf=True)
    run.x_train = run.vec.fit_transform(run.data.train.texts)  # (N_train, V) sparse
    run.vec_seconds = time.perf_counter() - t0
    run.x_dev, run.x_test = run.vec.transform(run.data.dev.texts), run.vec.transform(run.data.test.texts)


def pick_c(run: Run) -> None:
    """3. Pick C on dev: one fit per C on train, scored on dev (a table row each). Test is not looked at.
    The score is the task's metric (macro-F1 for emotion; by default macro-F1 when train is imbalanced)."""
    data, K, metric = run.data, run.data.num_labels, run.data.metric
    importlib.import_module("torch._dynamo")  # torch.optim imports it on first use (~2 s): pay that outside any fit's time
    print(f"{'C':>8} {'iters':>6} {'secs':>6}  dev accuracy [95% CI]      macro-F1")
    run.grid, fits = [], {}
    t_search = time.perf_counter()
    for C in run.args.grid:
        t0 = time.perf_counter()
        model, info = fit_logistic_regression(run.x_train, data.train.labels, K, C=C)
        seconds = time.perf_counter() - t0
        dev = evaluate_predictions(data.dev.labels, model.predict(run.x_dev), K)
        fits[C] = (model, seconds)
        run.grid.append({"C": C, "dev_accuracy": dev["accuracy"], "dev_macro_f1": dev["macro_f1"], "seconds": seconds, **info})
        print(f"{C:>8g} {info['iterations']:>6} {seconds:>6.2f}  {fmt_score(dev):<26} {dev['macro_f1']:.3f}"
              + ("" if info["converged"] else "  (hit max_iter)"))
    run.search_seconds = time.perf_counter() - t_search + run.vec_seconds
    # Best dev score; ties go to the other metric, then to the smaller C (the simpler model).
    other = "macro_f1" if metric == "accuracy" else "accuracy"
    run.best = max(run.grid, key=lambda r: (r[f"dev_{metric}"], r[f"dev_{other}"], -r["C"]))
    run.C = run.best["C"]
    run.model, run.fit_seconds = fits[run.C]


def evaluate_on_test(run: Run) -> None:
    """4. Test, once. The "zero-shot" row is the best you can do with no training at all: always
    answer the most common training label."""
    data, K = run.data, run.data.num_labels
    run.majority = Counter(data.train.labels).most_common(1)[0][0]
    run.zero_shot = evaluate_predictions(data.test.labels, [run.majority] * len(data.test), K)
    run.dev = evaluate_predictions(data.dev.labels, run.model.predict(run.x_dev), K)
    run.pred = run.model.predict(run.x_test)
    run.test = evaluate_predictions(data.test.labels, run.pred, K)
    run.wrong = wrong_examples(data.test.texts, data.test.labels, run.pred, data.label_names, limit=run.args.show_wrong)


def write_results(run: Run) -> Path:
    """5. The fitted model, saved for minilab.predict, and the results file. train_seconds is the
    cost of the model we report (features + one fit); search_seconds adds the other grid points,
    the honest price of choosing C."""
    args, data, names, C = run.args, run.data, run.data.label_names, run.C
    train_seconds = run.vec_seconds + run.fit_seconds
    run.payload = {
        "task": data.task,
        "model": f"tfidf-logreg (word 1-2-grams, sublinear tf, C={C:g})",
        "split_sizes": data.sizes(),
        "zero_shot": {**run.zero_shot, "predictor": f"majority class ({names[run.majority]})"},
        "fine_tuned": run.test,
        "train_seconds": train_seconds,
        "examples_per_second": len(data.train) / train_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "device": "cpu",
        "dtype": "float32",
        "seed": args.seed,
        "command": command_line(),
        "dev": run.dev,
        "C": C,
        "selected_by": f"dev {data.metric}",
        "grid": run.grid,
        "search_seconds": run.search_seconds,
        "num_features": run.x_train.shape[1],
        "label_names": names,
        "predictions": run.pred,
        "test_texts_wrong": run.wrong,
    }
    save_baseline(run.save_dir, run.vec, run.model, names, protect=[data.source, args.out])
    run.payload["save_dir"] = str(run.save_dir.resolve())  # absolute: `predict --run` works from any folder
    return results.write_results(run.payload, "baseline", root=args.out)


def main(argv=None) -> int:
    run = load_data(parse_args(argv))
    data, names = run.data, run.data.label_names
    print(f"task {data.task}: {data.sizes()}  labels {names}")
    check_save_dir(run)

    features(run)
    print(f"tf-idf: {run.x_train.shape[1]:,} terms (1-2-grams, min_df={run.args.min_df}) in {run.vec_seconds:.2f}s")

    pick_c(run)
    print(f"picked C={run.C:g} (best dev {data.metric}: {run.best[f'dev_{data.metric}']:.3f})")

    evaluate_on_test(run)
    print(f"majority class ({names[run.majority]}): test accuracy {fmt_score(run.zero_shot)}  "
          f"macro-F1 {run.zero_shot['macro_f1']:.3f}")
    print(f"tfidf-logreg C={run.C:g}: test accuracy {fmt_score(run.test)}  macro-F1 {run.test['macro_f1']:.3f}")
    for w in run.wrong[:3]:
        print(f"  wrong: true={w['true']} pred={w['pred']}  {w['text'][:100]!r}")

    path = write_results(run)
    r = run.payload
    print(f"wrote {path}  (train {r['train_seconds']:.2f}s, search {r['search_seconds']:.2f}s, "
          f"peak RSS {r['peak_rss_mb']:.0f} MB)")
    return 0


if __name__ == "__main__":
    run_main(main)
