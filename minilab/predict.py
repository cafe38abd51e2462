"""Classify new texts with whatever the lab trained: a BERT folder, a LoRA adapter, or the baseline.

    python -m minilab.predict runs/sst2/bert "a gorgeous, witty film" "a dull mess"
    echo "a dull mess" | python -m minilab.predict runs/sst2/llama-adapter
    python -m minilab.predict --run results/sst2/baseline.json --input new.csv --text-col text --output out.csv
    python -m minilab.predict runs/sst2/llama-adapter --merge runs/sst2/llama-merged   # a plain Hub folder

From Python:

    from minilab import load_classifier
    clf = load_classifier("runs/sst2/bert")
    clf.predict(["a dull mess"])        # ['negative']
    clf.predict_proba(["a dull mess"])  # [[0.97, 0.03]]

Each saved folder carries a `minilab.json` that says what it is and how its training run turned a
text into model input (label names; BERT's length and cut; the LLaMA's prompt format; the
precision), so that predictions here equal the training script's own test predictions. The
probabilities are: the softmax of BERT's logits; the LLaMA's label-answer likelihoods normalised
over the labels; the baseline's logistic-regression probabilities.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

from .bert_infer import bert_encode, bert_logits
from .files import MARKER as META, MetaError, read_meta as _read_meta, write_meta


class PredictError(ValueError):
    """The model path or the input is unusable; the message says what to do."""


def read_meta(folder: Path) -> dict:
    """The folder's minilab.json (minilab.files.read_meta); a corrupt one as a PredictError."""
    try:
        return _read_meta(folder)
    except MetaError as e:
        raise PredictError(str(e)) from e


def _amp(device: torch.device, precision: str | None):
    """The autocast a model was trained in. A model trained in fp16 (CUDA's) runs on a CPU in bf16
    where its matmuls are fast, else in fp32; one trained in bf16 stays in bf16 there, slow on a CPU
    without oneDNN bf16, so that its predictions are the training script's own."""
    from .precision import autocast, cpu_has_fast_bf16, precision_dtype

    dtype = precision_dtype(precision)
    if dtype is not None and device.type == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16 if cpu_has_fast_bf16() else None
    return autocast(device, dtype)


# --------------------------------------------------------------------------------------------
# BERT: the encoding and batching train_bert.py evaluates with (minilab/bert_infer.py)


class BertClassifier:
    def __init__(self, folder: Path, device: torch.device):
        from .bert_fast import speed_up, use_fast
        from .weights import load_bert_classifier

        meta = read_meta(folder)
        self.label_names = meta["label_names"]
        self.model, self.tokenizer = load_bert_classifier(str(folder), num_labels=len(self.label_names))
        self.model.to(device).eval()
        if use_fast("auto", device):
            speed_up(self.model)
        self.device, self.meta = device, meta

    def predict_proba(self, texts: list[str]) -> list[list[float]]:
        ids = bert_encode(self.tokenizer, texts, self.meta["max_length"], self.meta["keep_tail"])
        logits = bert_logits(self.model, self.tokenizer, ids, self.device, _amp(self.device, self.meta.get("precision")))
        return logits.softmax(-1).tolist()


# --------------------------------------------------------------------------------------------
# The LLaMA with its LoRA adapter: label scoring, exactly as train_dpo.py evaluates


class LlamaClassifier:
    def __init__(self, folder: Path, device: torch.device, base: str | None = None, dtype: str | None = None):
        from .prompts import PromptBuilder, PromptFormat, answer_token_ids
        from .hub import HubError
        from .weights import load_llama
        from .peft_io import load_adapter

        meta = read_meta(folder)
        if base and not Path(base).expanduser().exists() and _path_like(base):
            raise PredictError(f"--base {base} does not exist: pass the base model's folder or .gguf file")
        base = base or _adapter_base(folder)
        self.label_names = meta["label_names"]
        try:
            self.model, self.tokenizer = load_llama(base, dtype=getattr(torch, dtype or meta.get("base_dtype", "float32")))
        except HubError as e:  # a Hub id that is not there: the flag to name is predict's own
            raise PredictError(f"base model {base}: {str(e).replace('--model ', '--base ')}") from e
        self.head = meta.get("kind") == "llama-head"  # a K-way head on the last prompt token (--objective head)
        if self.head:
            from .llama_cls import LlamaForSequenceClassification

            self.model = LlamaForSequenceClassification.from_causal_lm(self.model, len(self.label_names))
        load_adapter(self.model, folder)
        self.model.to(device).eval()
        self.fmt = PromptFormat(**meta["prompt_format"])
        self.builder = PromptBuilder(self.tokenizer, self.fmt)
        self.answers = answer_token_ids(self.tokenizer, self.fmt)
        self.device, self.meta, self.base, self.folder = device, meta, base, folder

    def predict_proba(self, texts: list[str]) -> list[list[float]]:
        from .lmclassifier import classify, classify_with_head

        prompts = [self.builder.example(t) for t in texts]
        if self.head:  # the head's own probabilities
            return classify_with_head(self.model, self.builder.prefix, prompts, self.device,
                                      _amp(self.device, self.meta.get("precision")))[1]
        _, scores, _ = classify(self.model, self.tokenizer, self.builder.prefix, prompts, self.answers, self.device,
                                _amp(self.device, self.meta.get("precision")))
        return torch.tensor(scores).softmax(-1).tolist()  # the answers' likelihoods, normalised over the labels

    def merge(self, out: str | Path) -> Path:
        """Fold the LoRA into the base weights and write a plain Hub folder (no adapter needed): a
        LlamaForCausalLM, or for a head a LlamaForSequenceClassification (transformers loads both)."""
        from .weights import save_llama, save_llama_classifier
        from .lora import merge_and_unload
        from .results import atomic_folder

        model = merge_and_unload(self.model)
        with atomic_folder(out, protect=[self.folder, self.base], flag="--merge") as tmp:  # never over the adapter or base
            if self.head:
                save_llama_classifier(model.float(), self.tokenizer, tmp, self.label_names)
            else:
                save_llama(model.float(), self.tokenizer, tmp)
            base = str(Path(self.base).resolve()) if Path(self.base).exists() else self.base
            write_meta(tmp, {"kind": "llama-merged", "label_names": self.label_names, "base": base,
                             "adapter": str(Path(self.folder).resolve()), "prompt_format": self.meta["prompt_format"]})
        return Path(out)


def _path_like(name: str) -> bool:
    """A name that can only be a path (a Hub id is `org/name`)."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or name.endswith(".gguf") or "\\" in name


def _adapter_base(folder: Path) -> str:
    """The base model named in the adapter's config. Adapters minilab writes now record a local base
    by its absolute path; an older one recorded it relative to the training run's folder, so a
    relative name is also looked for from the project folder (runs/<task>/<adapter> -> ../../..)."""
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise PredictError(f"{folder}/adapter_config.json names no base model: pass --base MODEL")
    if Path(base).expanduser().exists():
        return base
    parents = Path(folder).resolve().parents
    if not Path(base).expanduser().is_absolute() and len(parents) > 2 and (parents[2] / base).exists():
        return str(parents[2] / base)
    if _path_like(base):
        raise PredictError(f"the adapter's base model {base} does not exist here: pass --base MODEL "
                           "(the base model's folder or .gguf file)")
    return base  # a Hub id


# --------------------------------------------------------------------------------------------
# The baseline: TF-IDF + logistic regression, as minilab.tfidf.save_baseline saved it


class BaselineClassifier:
    def __init__(self, folder: Path):
        from safetensors.torch import load_file

        from .tfidf import LogisticRegression, TfidfVectorizer

        meta = read_meta(folder)
        self.label_names = meta["label_names"]
        t = load_file(str(folder / "model.safetensors"))
        self.vec = TfidfVectorizer(ngram_range=tuple(meta["ngram_range"]), min_df=meta["min_df"],
                                   sublinear_tf=meta["sublinear_tf"])
        self.vec.vocabulary_ = {term: i for i, term in enumerate(json.loads((folder / "vocabulary.json").read_text()))}
        self.vec.idf_ = t["idf"]
        self.model = LogisticRegression(t["weight"].shape[0], len(self.label_names))
        with torch.no_grad():
            self.model.weight.copy_(t["weight"])
            self.model.bias.copy_(t["bias"])

    def predict_proba(self, texts: list[str]) -> list[list[float]]:
        with torch.no_grad():
            return self.model(self.vec.transform(texts)).softmax(-1).tolist()


# --------------------------------------------------------------------------------------------
# One entry point for the three kinds


class Classifier:
    """What `load_classifier` returns: `predict(texts)` gives label names, `predict_proba(texts)` one
    probability per label (in `label_names` order) for each text."""

    def __init__(self, impl, kind: str, path: Path):
        self.impl, self.kind, self.path = impl, kind, path
        self.label_names: list[str] = list(impl.label_names)

    def predict_proba(self, texts: list[str]) -> list[list[float]]:
        return self.impl.predict_proba(list(texts)) if texts else []

    def predict(self, texts: list[str]) -> list[str]:
        return [self.label_names[max(range(len(p)), key=p.__getitem__)] for p in self.predict_proba(texts)]


def load_classifier(path: str | Path, device: str | None = None, base: str | None = None,
                    base_dtype: str | None = None) -> Classifier:
    """A saved BERT folder, a LoRA adapter folder (its base model from the adapter's config, or
    `base`; loaded in `base_dtype`, default the training run's), a saved baseline folder, or a
    results file `results/<task>/<name>.json` (its model)."""
    from .distributed import pick_device

    path = Path(path)
    if not path.exists():
        raise PredictError(f"{path} does not exist: pass a trained model folder (runs/<task>/...) or a results file")
    if path.is_file():
        if path.suffix != ".json":
            raise PredictError(f"{path} is a file but not a results file (.json): pass a trained model folder")
        try:
            r = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PredictError(f"results file {path} is not valid JSON ({e})") from e
        saved = r.get("save_dir")
        if not saved:
            raise PredictError(f"results file {path} names no saved model (save_dir): rerun its step to save one")
        return load_classifier(_saved_model(path, saved), device, base, base_dtype)
    dev = pick_device(device)
    if not (path / META).is_file():
        raise PredictError(f"{path} is not a model minilab saved (no {META}): pass the folder train_bert.py, "
                           "train_dpo.py or baseline.py wrote")
    kind = read_meta(path).get("kind")
    if kind == "bert":
        return Classifier(BertClassifier(path, dev), kind, path)
    if kind in ("llama-lora", "llama-head"):
        return Classifier(LlamaClassifier(path, dev, base, base_dtype), kind, path)
    if kind == "baseline":
        return Classifier(BaselineClassifier(path), kind, path)
    if kind == "llama-merged":
        raise PredictError(f"{path} is a merged LLaMA folder: load it with transformers, or predict with the adapter "
                           f"folder {read_meta(path).get('adapter', 'it was merged from')}")
    raise PredictError(f"{path / META} names an unknown kind {kind!r}")


def _saved_model(results_file: Path, saved: str) -> Path:
    """The model folder a results file names. Results written now hold an absolute path; an older
    file's relative one was relative to the run's project folder (results/<task>/x.json -> ../..),
    which is tried first, then the current folder."""
    p = Path(saved).expanduser()
    if p.is_absolute():
        return p
    parents = results_file.resolve().parents
    roots = ([parents[2]] if len(parents) > 2 else []) + [Path.cwd()]
    found = next((r / p for r in roots if (r / p).exists()), None)
    if found is None:
        raise PredictError(f"results file {results_file} names save_dir {saved}, which is under none of "
                           f"{', '.join(map(str, roots))}: pass the model folder itself")
    return found


# --------------------------------------------------------------------------------------------
# The command line


def read_texts(args) -> list[str]:
    """The texts to classify: --input's column --text-col (read as strictly as training data, see
    minilab.data.read_table: a malformed row is one line naming the file and its line), else the
    arguments, else stdin (one text per line)."""
    if args.input:
        from .data import DataError, read_table

        path = Path(args.input)
        if not path.is_file():
            raise PredictError(f"input file {path} does not exist")
        try:
            table = read_table(path)
        except DataError as e:
            raise PredictError(str(e)) from e
        if not table.rows:
            raise PredictError(f"input file {path} has no rows")
        if args.text_col not in table.columns:
            raise PredictError(f"{path} has no column {args.text_col!r} (columns: {', '.join(table.columns)}); pass --text-col NAME")
        texts = []
        for row, at in zip(table.rows, table.where):
            text = row.get(args.text_col)
            if text is not None and not isinstance(text, str):
                raise PredictError(f"{path}, {at}: the text in column {args.text_col!r} (--text-col) is "
                                   f"{type(text).__name__} {text!r:.40}, not a string: check --text-col, or fix the row")
            if text is None or not text.strip():
                what = "no" if args.text_col not in row else "empty"
                raise PredictError(f"{path}, {at}: {what} text in column {args.text_col!r} (--text-col); fill it in or remove the row")
            texts.append(text)
        return texts
    if args.texts:
        return list(args.texts)
    if sys.stdin is None or sys.stdin.isatty():
        raise PredictError("no texts: pass them as arguments, on stdin (one per line), or with --input FILE")
    return [line.rstrip("\n") for line in sys.stdin if line.strip()]


def write_output(path: str | None, texts: list[str], labels: list[str], probs: list[list[float]], names: list[str]) -> None:
    if path is None:
        from .report import markdown_table

        rows = [[(t[:60] + "…") if len(t) > 61 else t, lab, *(f"{p:.3f}" for p in ps)] for t, lab, ps in zip(texts, labels, probs)]
        print(markdown_table(["text", "label", *(f"p({n})" for n in names)], rows))
        return
    out = Path(path)
    if out.suffix == ".jsonl":
        with open(out, "w") as f:
            for t, lab, ps in zip(texts, labels, probs):
                f.write(json.dumps({"text": t, "label": lab, "probs": dict(zip(names, ps))}) + "\n")
    else:
        with open(out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label", *(f"p_{n}" for n in names)])
            w.writerows([t, lab, *ps] for t, lab, ps in zip(texts, labels, probs))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minilab-predict", description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", help="a saved model folder (BERT, LoRA adapter or baseline)")
    p.add_argument("texts", nargs="*", help="texts to classify (default: --input, else stdin, one per line)")
    p.add_argument("--run", default=None, help="a results file, results/<task>/<name>.json: its saved model")
    p.add_argument("--input", default=None, help="a .csv/.tsv/.jsonl/.parquet file of texts")
    p.add_argument("--text-col", default="text")
    p.add_argument("--output", default=None, help="write a .csv or .jsonl file instead of a table")
    p.add_argument("--base", default=None, help="the LLaMA base model, when the adapter's own is not here")
    from .cli import device_arg, positive_int

    p.add_argument("--batch-size", type=positive_int, default=256, help="texts per call (each model batches further inside)")
    p.add_argument("--device", type=device_arg, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--merge", default=None, metavar="DIR",
                   help="LLaMA only: fold the LoRA into the base and write a Hub folder transformers loads")
    args = p.parse_intermixed_args(argv)  # texts may come after options: predict ADAPTER --base X "a text"
    target = args.run or args.model
    if target is None:
        raise PredictError("pass a model folder or --run results/<task>/<name>.json")
    if args.run and args.model:  # the first positional is then a text
        args.texts = [args.model, *args.texts]
    if args.merge:  # refused before the (slow) model load; checked again with the base model at the write
        from .files import check_output_folder

        cfg = Path(target) / "adapter_config.json"
        recorded = json.loads(cfg.read_text()).get("base_model_name_or_path") if cfg.is_file() else None
        check_output_folder(args.merge, [target, args.base or recorded], flag="--merge")
    clf = load_classifier(target, args.device, args.base, base_dtype="float32" if args.merge else None)
    if args.merge:
        if clf.kind not in ("llama-lora", "llama-head"):
            raise PredictError(f"--merge is for a LoRA adapter; {clf.path} is a {clf.kind} model")
        print(f"merged model written to {clf.impl.merge(args.merge)}")
        return 0
    texts = read_texts(args)
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    probs: list[list[float]] = []
    chunks = range(0, len(texts), args.batch_size)
    for i in tqdm(chunks, desc="classify", disable=len(chunks) < 2 or not sys.stderr.isatty()):
        probs += clf.predict_proba(texts[i : i + args.batch_size])
    seconds = time.perf_counter() - t0
    labels = [clf.label_names[max(range(len(ps)), key=ps.__getitem__)] for ps in probs]
    write_output(args.output, texts, labels, probs, clf.label_names)
    print(f"{len(texts)} texts in {seconds:.1f}s ({len(texts) / max(seconds, 1e-9):.1f} texts/s) with {clf.kind} model {clf.path}",
          file=sys.stderr)
    return 0


def cli() -> None:
    from .cli import run_main

    run_main(main)


if __name__ == "__main__":
    cli()
