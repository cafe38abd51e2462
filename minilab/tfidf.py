"""The reference model: TF-IDF features and a multinomial logistic regression, in plain PyTorch.

Every fine-tuned transformer in the lab is compared with this row, so it has to be a strong,
well-understood classical baseline, not a straw man. It is the textbook recipe (the same one
scikit-learn's `TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)` + `LogisticRegression`
computes, which the tests check), written out so that every step is visible:

    tokens   lowercase, then words of 2+ word characters: the regex (?u)\\b\\w\\w+\\b
    terms    every word and every pair of adjacent words (1- and 2-grams)
    tf       1 + log(count)            "sublinear": the 5th "great" says less than the 1st
    idf      log((1 + n) / (1 + df)) + 1   rare terms weigh more; the +1s avoid dividing by 0
    row      tf * idf, scaled to unit L2 norm, so long reviews are not louder than short ones

The classifier minimises C * sum_i CE(x_i, y_i) + 0.5 * ||W||^2 (the bias is not penalised),
which is scikit-learn's parametrisation of C: a larger C trusts the data more. It is trained
full-batch with L-BFGS, which on a convex problem like this one is deterministic and converges in
tens of iterations, so there is no learning rate, batch size or epoch count to tune: only C.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .files import atomic_folder, write_meta

TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default: words of two or more word characters


class TfidfVectorizer:
    """Texts -> a sparse (N, V) float32 matrix of L2-normalised TF-IDF rows.

    `fit` learns the vocabulary (terms seen in at least `min_df` training texts, numbered in
    alphabetical order) and each term's idf; `transform` then maps any texts onto those columns,
    silently dropping terms that training never saw.
    """

    def __init__(self, ngram_range: tuple[int, int] = (1, 2), min_df: int = 1, sublinear_tf: bool = True,
                 lowercase: bool = True, token_pattern: str = TOKEN_PATTERN):
        lo, hi = ngram_range
        if not 1 <= lo <= hi:
            raise ValueError(f"ngram_range must be (lo, hi) with 1 <= lo <= hi, got {ngram_range}")
        if min_df < 1:
            raise ValueError(f"min_df must be a count >= 1, got {min_df}")
        self.ngram_range = (lo, hi)
        self.min_df = min_df
        self.sublinear_tf = sublinear_tf
        self.lowercase = lowercase
        self.token_re = re.compile(token_pattern)
        self.vocabulary_: dict[str, int] | None = None
        self.idf_: torch.Tensor | None = None  # (V,) float64

    # ---------------------------------------------------------------------------------------
    def terms(self, text: str) -> list[str]:
        """The n-grams of one text, in order: all unigrams first, then all bigrams, ..."""
        if self.lowercase:
            text = text.lower()
        tokens = self.token_re.findall(text)
        lo, hi = self.ngram_range
        out = []
        for n in range(lo, hi + 1):
            out.extend(" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        return out

    def fit(self, texts: list[str]) -> "TfidfVectorizer":
        df: Counter = Counter()
        for text in texts:
            df.update(set(self.terms(text)))  # document frequency: each text counts a term once
        kept = sorted(t for t, c in df.items() if c >= self.min_df)
        if not kept:
            raise ValueError(f"no terms left from {len(texts)} texts (min_df={self.min_df}): the texts hold no words "
                             f"matching {self.token_re.pattern!r}, or min_df is too high")
        self.vocabulary_ = {t: i for i, t in enumerate(kept)}
        n = len(texts)
        counts = torch.tensor([df[t] for t in kept], dtype=torch.float64)
        self.idf_ = torch.log((1 + n) / (1 + counts)) + 1  # smooth idf: as if one extra text held every term
        return self

    def transform(self, texts: list[str]) -> torch.Tensor:
        if self.vocabulary_ is None:
            raise RuntimeError("TfidfVectorizer.transform called before fit")
        vocab = self.vocabulary_
        rows, cols, vals = [], [], []
        for r, text in enumerate(texts):
            tf = Counter(vocab[t] for t in self.terms(text) if t in vocab)
            for c, k in sorted(tf.items()):
                rows.append(r)
                cols.append(c)
                vals.append(1.0 + math.log(k) if self.sublinear_tf else float(k))
        rows_t = torch.tensor(rows, dtype=torch.long)
        cols_t = torch.tensor(cols, dtype=torch.long)
        w = torch.tensor(vals, dtype=torch.float64) * self.idf_[cols_t]  # tf * idf, in float64 until the end
        sq = torch.zeros(len(texts), dtype=torch.float64).index_add_(0, rows_t, w * w)  # (N,) squared row norms
        norm = sq.sqrt().clamp_min(1e-300)  # a text with no known term stays an all-zero row
        w = w / norm[rows_t]
        return torch.sparse_coo_tensor(torch.stack([rows_t, cols_t]), w.float(), (len(texts), len(vocab)),
                                       is_coalesced=True, check_invariants=False)

    def fit_transform(self, texts: list[str]) -> torch.Tensor:
        return self.fit(texts).transform(texts)

    def feature_names(self) -> list[str]:
        return sorted(self.vocabulary_, key=self.vocabulary_.get)


# -------------------------------------------------------------------------------------------
# Multinomial logistic regression


def to_csr(x: torch.Tensor) -> torch.Tensor:
    """A sparse COO matrix as CSR (compressed rows), the layout whose matmul with a dense matrix is fast."""
    if x.layout == torch.sparse_csr:
        return x
    with warnings.catch_warnings():  # torch calls its CSR support "beta"; the matmul we use is solid
        warnings.simplefilter("ignore")
        return x.coalesce().to_sparse_csr()


class _SparseMatmul(torch.autograd.Function):
    """x @ w for a sparse x and a dense trainable w, whose backward is the one sparse matmul x^T @ g.

    Autograd's generic sparse path re-derives x^T on every backward call, which costs far more than
    the matmul itself; L-BFGS calls backward a hundred times, so we transpose x once instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, xt: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.xt = xt
        return x @ w  # (N, V) @ (V, K) -> (N, K)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None, ctx.xt @ grad  # (V, N) @ (N, K) -> (V, K): dL/dw


class LogisticRegression(nn.Module):
    """logits = X @ W + b.

    With two classes it keeps ONE weight vector w and sets the logits to (0, x.w + b), which is
    plain binary logistic regression. (Two free vectors would give the same predictions but an L2
    penalty on both halves the effective penalty, so C would not mean what it means elsewhere.)
    With K > 2 classes it keeps K vectors: the symmetric multinomial model.
    """

    def __init__(self, num_features: int, num_labels: int):
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got {num_labels}")
        self.num_labels = num_labels
        k = 1 if num_labels == 2 else num_labels
        self.weight = nn.Parameter(torch.zeros(num_features, k))  # (V, K') zeros: a convex problem needs no random init
        self.bias = nn.Parameter(torch.zeros(k))  # (K',)

    def forward(self, x: torch.Tensor, xt: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, V), dense or sparse. While training on a sparse x, pass xt = x^T (CSR) too."""
        if xt is not None:
            z = _SparseMatmul.apply(x, xt, self.weight)  # (N, K')
        elif x.is_sparse or x.layout == torch.sparse_csr:
            z = to_csr(x) @ self.weight
        else:
            z = x @ self.weight
        z = z + self.bias
        if self.num_labels == 2:
            z = torch.cat([torch.zeros_like(z), z], dim=1)  # (N, 2)
        return z

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> list[int]:
        return self(x).argmax(dim=1).tolist()


def fit_logistic_regression(x: torch.Tensor, y: list[int] | torch.Tensor, num_labels: int, C: float = 1.0,
                            max_iter: int = 1000, tol: float = 1e-6) -> tuple[LogisticRegression, dict]:
    """Train to the minimum of C * sum_i CE_i + 0.5 * ||W||^2 with full-batch L-BFGS.

    We minimise that objective divided by C * N (mean CE + ||W||^2 / (2 C N)): the same minimum, but
    a loss near 1 whatever C and N are, which keeps L-BFGS's tolerances meaningful.
    Returns the model and a small report (iterations, final loss, whether it converged).
    """
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    y = torch.as_tensor(y, dtype=torch.long)
    n, v = x.shape
    if x.is_sparse or x.layout == torch.sparse_csr:
        x, xt = to_csr(x), to_csr(x.t())  # (N, V) and (V, N), made once
    else:
        xt = None
    model = LogisticRegression(v, num_labels)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=tol, tolerance_change=1e-12, line_search_fn="strong_wolfe")
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = F.cross_entropy(model(x, xt), y) + model.weight.pow(2).sum() / (2 * C * n)
        loss.backward()
        return loss

    opt.step(closure)  # one step = up to max_iter L-BFGS iterations
    state = opt.state[opt._params[0]]
    iters = int(state.get("n_iter", 0))
    with torch.no_grad():
        loss = float(F.cross_entropy(model(x), y) + model.weight.pow(2).sum() / (2 * C * n))
        grad_max = max(float(p.grad.abs().max()) for p in model.parameters())
    return model, {"iterations": iters, "loss_evals": calls, "loss": loss, "grad_max": grad_max,
                   "converged": iters < max_iter}


def save_baseline(folder: str | Path, vec: TfidfVectorizer, model: LogisticRegression, label_names: list[str],
                  protect=()) -> Path:
    """The baseline as files, for `minilab.predict`: vocabulary (JSON, in column order), idf and
    weights (safetensors), and `minilab.json`. `protect`: folders the run read (its data), which
    `folder` must not be or hold."""
    from safetensors.torch import save_file

    with atomic_folder(folder, protect) as tmp:
        (tmp / "vocabulary.json").write_text(json.dumps(vec.feature_names()))
        save_file({"idf": vec.idf_, "weight": model.weight.detach().contiguous(), "bias": model.bias.detach()},
                  str(tmp / "model.safetensors"))
        write_meta(tmp, {"kind": "baseline", "label_names": list(label_names), "ngram_range": list(vec.ngram_range),
                         "min_df": vec.min_df, "sublinear_tf": vec.sublinear_tf})
    return Path(folder)
