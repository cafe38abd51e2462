"""The TF-IDF + logistic-regression baseline, checked against scikit-learn (a test-only dependency).

- the TF-IDF matrix and vocabulary equal sklearn's TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True);
- the logistic regression reaches sklearn's optimum (same C parametrisation, unpenalised bias), for
  two classes (one weight vector) and for several (multinomial);
- baseline.py runs end to end on steam, its results file is complete and self-consistent, and its test
  accuracy is within 0.02 of sklearn's pipeline at the same C; bad input is one line and exit code 2.
"""

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from minilab.data import load_task
from minilab.results import REQUIRED
from minilab.tfidf import LogisticRegression, TfidfVectorizer, fit_logistic_regression

sklearn = pytest.importorskip("sklearn")
from sklearn.feature_extraction.text import TfidfVectorizer as SkTfidf  # noqa: E402
from sklearn.linear_model import LogisticRegression as SkLogReg  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

SENTENCES = [
    "The game is GREAT, great fun and great music!",
    "Boring. Boring boring... I want my money back",
    "Great music; the story is boring",
    "a b c",  # one-letter words are not tokens: this row has no terms at all
    "Naïve café owners love the café — déjà vu",  # unicode word characters
    "money money money money money",  # sublinear tf: 1 + log(5), not 5
]


@pytest.mark.parametrize("min_df", [1, 2])
def test_tfidf_matches_sklearn(min_df):
    ours = TfidfVectorizer(ngram_range=(1, 2), min_df=min_df, sublinear_tf=True)
    x = ours.fit_transform(SENTENCES)
    sk = SkTfidf(ngram_range=(1, 2), min_df=min_df, sublinear_tf=True)
    ref = sk.fit_transform(SENTENCES).toarray()
    assert ours.vocabulary_ == {t: int(i) for t, i in sk.vocabulary_.items()}
    assert x.shape == ref.shape
    np.testing.assert_allclose(x.to_dense().numpy(), ref, atol=1e-6, rtol=0)
    # Unseen texts map onto the training vocabulary the same way (unknown words dropped).
    new = ["great boring money", "nothing known here", "the story is great great"]
    np.testing.assert_allclose(ours.transform(new).to_dense().numpy(), sk.transform(new).toarray(), atol=1e-6, rtol=0)


def test_tfidf_arithmetic_by_hand():
    """One row worked out: 'money' x5 in a 2-text corpus where both texts hold 'money'."""
    v = TfidfVectorizer(ngram_range=(1, 1))
    x = v.fit_transform(["money money money money money honey", "money"]).to_dense()
    # df(money)=2, df(honey)=1, n=2: idf = ln(3/3)+1 = 1 and ln(3/2)+1
    tf_money, tf_honey = 1 + math.log(5), 1.0
    a, b = tf_money * 1.0, tf_honey * (math.log(1.5) + 1)
    norm = math.hypot(a, b)
    assert v.feature_names() == ["honey", "money"]
    assert x[0].tolist() == pytest.approx([b / norm, a / norm], abs=1e-7)
    assert x[1].tolist() == pytest.approx([0.0, 1.0], abs=1e-7)


def test_logreg_starts_at_log_k():
    """All-zero weights give uniform probabilities: the loss is ln K for any data (here K=2 and K=5)."""
    x = torch.randn(7, 3)
    for k in (2, 5):
        logits = LogisticRegression(3, k)(x)
        assert logits.shape == (7, k)
        y = torch.arange(7) % k
        assert torch.nn.functional.cross_entropy(logits, y).item() == pytest.approx(math.log(k), abs=1e-6)


@pytest.mark.parametrize("k,C", [(2, 0.5), (2, 20.0), (3, 0.5), (4, 5.0)])
def test_logreg_matches_sklearn_optimum(k, C):
    """Same objective, C * sum CE + 0.5 ||W||^2 with the bias free: same weights and bias."""
    g = torch.Generator().manual_seed(k)
    n, d = 120, 6
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, k, generator=g) + 0.7 * torch.randn(n, k, generator=g)).argmax(1)
    model, info = fit_logistic_regression(x, y.tolist(), k, C=C)
    sk = SkLogReg(C=C, tol=1e-10, max_iter=10_000).fit(x.double().numpy(), y.numpy())
    assert info["converged"]
    w = model.weight.detach().numpy()  # (d, 1) for two classes, (d, k) otherwise
    np.testing.assert_allclose(w, sk.coef_.T, atol=2e-3 * max(1.0, np.abs(sk.coef_).max()))
    np.testing.assert_allclose(model.bias.detach().numpy(), sk.intercept_, atol=2e-3 * max(1.0, np.abs(sk.intercept_).max()))
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1).numpy()
    np.testing.assert_allclose(p, sk.predict_proba(x.double().numpy()), atol=1e-3)


def test_logreg_sparse_and_dense_agree():
    """The sparse training path (custom backward x^T @ g) finds the same model as the dense one."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 30, generator=g)
    x[x < 0.8] = 0  # mostly zeros, like TF-IDF
    y = (torch.arange(50) % 3).tolist()
    dense, _ = fit_logistic_regression(x, y, 3, C=2.0)
    sparse, _ = fit_logistic_regression(x.to_sparse(), y, 3, C=2.0)
    torch.testing.assert_close(sparse.weight, dense.weight, atol=1e-4, rtol=0)
    assert sparse.predict(x.to_sparse()) == dense.predict(x)


def test_logreg_rejects_bad_c():
    with pytest.raises(ValueError, match="C must be > 0"):
        fit_logistic_regression(torch.zeros(2, 2), [0, 1], 2, C=0.0)


# ---------------------------------------------------------------------------------------------
# The script, end to end on the real steam data


def run_baseline(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "baseline.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def steam_run(shared_data, tmp_path_factory):
    folder = shared_data / "steam"
    if not (folder / "train.csv").is_file():
        pytest.skip(f"steam data not found in {folder}")
    out = tmp_path_factory.mktemp("results")
    proc = run_baseline("--data", folder, "--out", out, "--save-dir", out / "saved")
    assert proc.returncode == 0, proc.stderr
    return folder, json.loads((out / "steam" / "baseline.json").read_text()), proc.stdout


def test_script_writes_complete_results(steam_run):
    folder, r, stdout = steam_run
    data = load_task(str(folder))
    assert not [k for k in REQUIRED if k not in r]
    assert r["task"] == "steam" and r["device"] == "cpu" and r["dtype"] == "float32" and r["seed"] == 0
    assert r["split_sizes"] == {"train": 1168, "dev": 146, "test": 147}
    assert r["model"] == f"tfidf-logreg (word 1-2-grams, sublinear tf, C={r['C']:g})"
    assert r["C"] in [row["C"] for row in r["grid"]] and len(r["grid"]) >= 5
    # The chosen C has the best dev accuracy of the grid, and the dev block is that model's.
    assert r["dev"]["accuracy"] == max(row["dev_accuracy"] for row in r["grid"])
    # The reported test metrics are those of the stored predictions.
    pred = r["predictions"]
    assert len(pred) == 147
    correct = sum(p == y for p, y in zip(pred, data.test.labels))
    assert r["fine_tuned"]["accuracy"] == pytest.approx(correct / 147)
    lo, hi = r["fine_tuned"]["accuracy_ci95"]
    assert lo < r["fine_tuned"]["accuracy"] < hi
    # Zero-shot = always the majority training label ("not constructive", 0).
    majority = Counter(data.train.labels).most_common(1)[0][0]
    assert r["zero_shot"]["accuracy"] == pytest.approx(data.test.labels.count(majority) / 147)
    # Wrong examples really are wrong, with label names.
    for w in r["test_texts_wrong"]:
        assert w["true"] != w["pred"] and w["true"] in data.label_names and w["text"] in data.test.texts
    assert r["train_seconds"] > 0 and r["examples_per_second"] == pytest.approx(1168 / r["train_seconds"])
    # A TF-IDF model clearly beats predicting the majority class on this data.
    assert r["fine_tuned"]["accuracy"] > r["zero_shot"]["accuracy"] + 0.05
    assert "test accuracy" in stdout and f"C={r['C']:g}" in stdout


def test_script_accuracy_matches_sklearn(steam_run):
    """sklearn's own pipeline at the C the script picked: test accuracy within 0.02 (3 of 147 reviews).

    Both minimise the same objective, so we compare optima: sklearn's default tol=1e-4 stops its L-BFGS
    early at large C (at C=100 it scores 0.762 where the optimum scores 0.782); tol=1e-6 reaches it.
    """
    folder, r, _ = steam_run
    data = load_task(str(folder))
    vec = SkTfidf(ngram_range=(1, 2), sublinear_tf=True)
    x_train = vec.fit_transform(data.train.texts)
    clf = SkLogReg(C=r["C"], tol=1e-6, max_iter=5000).fit(x_train, data.train.labels)
    sk_pred = clf.predict(vec.transform(data.test.texts))
    sk_acc = float(np.mean(sk_pred == np.array(data.test.labels)))
    print(f"steam test accuracy at C={r['C']:g}: minilab {r['fine_tuned']['accuracy']:.4f}, sklearn {sk_acc:.4f}")
    assert abs(r["fine_tuned"]["accuracy"] - sk_acc) <= 0.02
    # Stronger than the accuracy: the two models predict the same label for (nearly) every review.
    assert np.mean(sk_pred == np.array(r["predictions"])) >= 0.98


def test_script_missing_column_is_one_line_exit_2(tmp_path):
    for split in ("train", "dev", "test"):
        (tmp_path / f"{split}.csv").write_text("review,label\ngood game,1\nbad game,0\n")
    proc = run_baseline("--data", tmp_path, "--out", tmp_path / "results", "--save-dir", tmp_path / "saved")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no column 'text'" in lines[0], proc.stderr
    assert "--text-col" in lines[0]
    assert not (tmp_path / "results").exists()


def test_script_missing_folder_is_one_line_exit_2(tmp_path):
    proc = run_baseline("--data", tmp_path / "nope", "--out", tmp_path / "results")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not exist" in lines[0], proc.stderr
