"""BERT's WordPiece tokenizer, through the `tokenizers` library (Rust, batched).

Apart from the model (`minilab/bert.py`) because a model does not need to know how its ids were
made; `minilab/weights.py` saves it beside the weights so that a saved folder loads as one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

class BertTokenizer:
    """WordPiece tokenisation through the `tokenizers` library (Rust, batched).

    Loaded from `tokenizer.json` when the checkpoint has one, else built from `vocab.txt` with
    BERT's normaliser (lower-casing per tokenizer_config.json). Padding and truncation stored in
    tokenizer.json are switched off: we pad per batch, to the longest sequence, ourselves.
    """

    def __init__(self, tokenizer, do_lower_case: bool = True, model_max_length: int = 512,
                 pad_token: str = "[PAD]"):
        self.tok = tokenizer
        self.tok.no_padding()
        self.tok.no_truncation()
        self.do_lower_case = do_lower_case
        self.model_max_length = model_max_length
        self.pad_token = pad_token
        self.pad_id = tokenizer.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self._max_length = None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Token ids with [CLS] ... [SEP], truncated to max_length, unpadded."""
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for [CLS] and [SEP]), got {max_length}")
        if max_length != self._max_length:
            self.tok.enable_truncation(max_length)  # keeps [SEP] at the end, as transformers does
            self._max_length = max_length
        return [e.ids for e in self.tok.encode_batch(list(texts))]

    def pad(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest sequence: input_ids, attention_mask, token_type_ids (B, T)."""
        T = max((len(x) for x in ids), default=0)
        input_ids = torch.full((len(ids), T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), T), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            attention_mask[i, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": torch.zeros_like(input_ids)}

    def __call__(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        return self.pad(self.encode(texts, max_length))

    def save(self, out_dir: str | Path) -> None:
        """tokenizer.json + vocab.txt + tokenizer_config.json, readable by transformers' AutoTokenizer."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tok.no_truncation()
        self._max_length = None
        self.tok.save(str(out / "tokenizer.json"))
        vocab = sorted(self.tok.get_vocab().items(), key=lambda kv: kv[1])
        (out / "vocab.txt").write_text("".join(tok + "\n" for tok, _ in vocab), encoding="utf-8")
        special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": self.pad_token,
                   "cls_token": "[CLS]", "mask_token": "[MASK]"}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.do_lower_case,
               "model_max_length": self.model_max_length, **special}
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _wordpiece_from_vocab(vocab_file: Path, lowercase: bool, strip_accents: bool | None):
    """BERT's tokenizer rebuilt from a bare vocab.txt (for checkpoints without tokenizer.json)."""
    tok = Tokenizer(models.WordPiece.from_file(str(vocab_file), unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise ValueError(f"{vocab_file} lacks [CLS] or [SEP]; it is not a BERT vocabulary")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    # special tokens written in the text stay whole, as in transformers' BertTokenizer
    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    tok.add_special_tokens([t for t in specials if tok.token_to_id(t) is not None])
    return tok


def load_bert_tokenizer(folder: str | Path) -> BertTokenizer:
    """The tokenizer of a checkpoint folder: tokenizer.json, else vocab.txt."""
    folder = Path(folder)
    cfg = {}
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e})") from e
    lower = bool(cfg.get("do_lower_case", True))
    max_len = cfg.get("model_max_length", 512)
    max_len = 512 if not isinstance(max_len, int) or max_len > 1_000_000 else max_len
    pad = cfg.get("pad_token", "[PAD]")
    pad = pad.get("content", "[PAD]") if isinstance(pad, dict) else pad
    if (folder / "tokenizer.json").is_file():
        try:
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            raise ValueError(f"{folder / 'tokenizer.json'} could not be read ({e}); re-download it") from e
    elif (folder / "vocab.txt").is_file():
        tok = _wordpiece_from_vocab(folder / "vocab.txt", lower, cfg.get("strip_accents"))
    else:
        raise ValueError(f"no tokenizer.json or vocab.txt in {folder}: the checkpoint has no BERT tokenizer")
    return BertTokenizer(tok, do_lower_case=lower, model_max_length=max_len, pad_token=pad)
