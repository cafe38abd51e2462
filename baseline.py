"""The reference row: TF-IDF + logistic regression, on the CPU, in seconds.

Every fine-tuned model in the lab is compared with this. It reads top to bottom like a notebook:
load the task, turn texts into TF-IDF vectors (word 1- and 2-grams, sublinear tf), fit one logistic
regression per value of C on train, keep the C that does best on dev, and report that model once
on test, with a 95% interval, since small test splits make every accuracy a noisy estimate.

    python baseline.py                          # steam, from $MINILAB_DATA/steam or the Hub
    python baseline.py --data ../shared/data/sst2 --out results

Writes results/<task>/baseline.json.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections import Counter
from pathlib import Path

import torch

from minilab.cli import nonneg_int, positive_float, positive_int, run_main, seed_int
from minilab.data import add_data_args, load_task_from_args
from minilab.files import check_output_folder
from minilab.metrics import evaluate_predictions
from minilab.predict import save_baseline
from minilab.results import command_line, fmt_score, peak_rss_mb, write_results
from minilab.tfidf import TfidfVectorizer, fit_logistic_regression

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


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    # %% 1. Data: three splits of (text, label), checked once by the shared loader.
    data = load_task_from_args(args)
    K, names = data.num_labels, data.label_names
    print(f"task {data.task}: {data.sizes()}  labels {names}")
    save_dir = Path(args.save_dir or f"runs/{data.task}/baseline")
    # Checked now, before any fit: a folder holding files minilab did not write, the data or the results is refused.
    check_output_folder(save_dir, [data.source], outputs=[args.out])

    # %% 2. Features: the vocabulary and idf come from train only; dev and test are just mapped onto them.
    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=args.min_df, sublinear_tf=True)
    x_train = vec.fit_transform(data.train.texts)  # (N_train, V) sparse
    vec_seconds = time.perf_counter() - t0
    x_dev, x_test = vec.transform(data.dev.texts), vec.transform(data.test.texts)
    print(f"tf-idf: {x_train.shape[1]:,} terms (1-2-grams, min_df={args.min_df}) in {vec_seconds:.2f}s")

    # %% 3. Pick C on dev: one fit per C on train, scored on dev. Test is not looked at.
    # The score is the task's metric (macro-F1 for emotion; by default macro-F1 when train is imbalanced).
    metric = data.metric
    importlib.import_module("torch._dynamo")  # torch.optim imports it on first use (~2 s): pay that outside any fit's time
    print(f"{'C':>8} {'iters':>6} {'secs':>6}  dev accuracy [95% CI]      macro-F1")
    grid, fits = [], {}
    t_search = time.perf_counter()
    for C in args.grid:
        t0 = time.perf_counter()
        model, info = fit_logistic_regression(x_train, data.train.labels, K, C=C)
        seconds = time.perf_counter() - t0
        dev = evaluate_predictions(data.dev.labels, model.predict(x_dev), K)
        fits[C] = (model, seconds)
        grid.append({"C": C, "dev_accuracy": dev["accuracy"], "dev_macro_f1": dev["macro_f1"], "seconds": seconds, **info})
        print(f"{C:>8g} {info['iterations']:>6} {seconds:>6.2f}  {fmt_score(dev):<26} {dev['macro_f1']:.3f}"
              + ("" if info["converged"] else "  (hit max_iter)"))
    search_seconds = time.perf_counter() - t_search + vec_seconds
    # Best dev score; ties go to the other metric, then to the smaller C (the simpler model).
    other = "macro_f1" if metric == "accuracy" else "accuracy"
    best = max(grid, key=lambda r: (r[f"dev_{metric}"], r[f"dev_{other}"], -r["C"]))
    C = best["C"]
    model, fit_seconds = fits[C]
    print(f"picked C={C:g} (best dev {metric}: {best[f'dev_{metric}']:.3f})")

    # %% 4. Test, once. The "zero-shot" row is the best you can do with no training at all:
    # always answer the most common training label.
    majority = Counter(data.train.labels).most_common(1)[0][0]
    zero_shot = evaluate_predictions(data.test.labels, [majority] * len(data.test), K)
    dev = evaluate_predictions(data.dev.labels, model.predict(x_dev), K)
    pred = model.predict(x_test)
    test = evaluate_predictions(data.test.labels, pred, K)
    print(f"majority class ({names[majority]}): test accuracy {fmt_score(zero_shot)}  macro-F1 {zero_shot['macro_f1']:.3f}")
    print(f"tfidf-logreg C={C:g}: test accuracy {fmt_score(test)}  macro-F1 {test['macro_f1']:.3f}")

    wrong = [i for i, (y, p) in enumerate(zip(data.test.labels, pred)) if y != p][: args.show_wrong]
    for i in wrong[:3]:
        print(f"  wrong: true={names[data.test.labels[i]]} pred={names[pred[i]]}  {data.test.texts[i][:100]!r}")

    # %% 5. The results file. train_seconds is the cost of the model we report (features + one fit);
    # search_seconds adds the other grid points, the honest price of choosing C.
    train_seconds = vec_seconds + fit_seconds
    payload = {
        "task": data.task,
        "model": f"tfidf-logreg (word 1-2-grams, sublinear tf, C={C:g})",
        "split_sizes": data.sizes(),
        "zero_shot": {**zero_shot, "predictor": f"majority class ({names[majority]})"},
        "fine_tuned": test,
        "train_seconds": train_seconds,
        "examples_per_second": len(data.train) / train_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "device": "cpu",
        "dtype": "float32",
        "seed": args.seed,
        "command": command_line(),
        "dev": dev,
        "C": C,
        "selected_by": f"dev {metric}",
        "grid": grid,
        "search_seconds": search_seconds,
        "num_features": x_train.shape[1],
        "label_names": names,
        "predictions": pred,
        "test_texts_wrong": [
            {"text": data.test.texts[i], "true": names[data.test.labels[i]], "pred": names[pred[i]]} for i in wrong
        ],
    }
    save_baseline(save_dir, vec, model, names, protect=[data.source, args.out])
    payload["save_dir"] = str(save_dir.resolve())  # absolute: `predict --run` works from any folder
    path = write_results(payload, "baseline", root=args.out)
    print(f"wrote {path}  (train {train_seconds:.2f}s, search {search_seconds:.2f}s, peak RSS {payload['peak_rss_mb']:.0f} MB)")
    return 0


if __name__ == "__main__":
    run_main(main)
