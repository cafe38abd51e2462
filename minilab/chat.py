"""Tokeniser and chat formatting for the causal LMs (LLaMA-3.x, SmolLM2).

`ChatTokenizer` wraps a `tokenizers.Tokenizer` (Rust, fast) read from a checkpoint's
`tokenizer.json`, or rebuilt from a GGUF file's metadata, which stores the vocabulary and merges
but no `tokenizer.json`.

Chat formatting is written out in Python rather than by running the checkpoint's Jinja template:
there are only two formats in play, both short, and spelling them out shows exactly which tokens
the model sees. The format is picked from the vocabulary's special tokens:

    LLaMA-3:  <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>...
    ChatML:   <|im_start|>user\nHi<|im_end|>\n...                          (SmolLM2, Qwen)

Templates also add a default system turn, which we copy: LLaMA-3.1/3.2 always open with a system
block stating a knowledge cut-off and a date (we write a fixed one, `LLAMA3_DATE`, so that a seeded
run's prompts are the same every day); SmolLM2 inserts "You are a helpful AI assistant
named SmolLM..." when the conversation has no system message. The tests compare our ids with
transformers' `apply_chat_template` on the same tokenizer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

LLAMA3_KNOWLEDGE_CUTOFF = "December 2023"
# The "Today Date" we write: the template's own fallback when it has no clock (a fixed date, so that
# prompts, and a seeded run, do not change from day to day).
LLAMA3_DATE = "26 Jul 2024"

# Pre-tokeniser splits for the byte-level GGUF vocabularies we know, by `tokenizer.ggml.pre`.
# llama.cpp names the regex the vocabulary's merges were trained with; the same regex must split
# the text before BPE or words get merged differently.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(pre: str):
    """The pre-tokeniser a GGUF's `tokenizer.ggml.pre` names."""
    if pre in ("default", "gpt2", "gpt-2", "starcoder"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # GPT-2's regex, after cutting every digit into its own piece
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in ("llama3", "llama-v3", "llama-bpe"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise ValueError(
        f"GGUF tokenizer.ggml.pre={pre!r} is not supported (known: default, gpt2, smollm, llama-bpe): "
        "use the model's Hub folder with its tokenizer.json instead"
    )


def _token_text(tok) -> str | None:
    """tokenizer_config.json spells special tokens as a string or as {"content": ...}."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class ChatTokenizer:
    """Text <-> ids, plus the chat format of the model.

    bos_id / eos_id / pad_id: ids of the checkpoint's special tokens (pad falls back to a reserved
    padding token or to EOS, since LLaMA-3 has no pad token and padded positions are masked anyway).
    eot_ids: every id that ends an assistant turn; generation stops on any of them.
    """

    def __init__(self, tokenizer: Tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None,
                 extra_eos_ids: tuple[int, ...] | list[int] = ()):
        self.tokenizer = tokenizer
        self.chat_template = chat_template or ""
        tid = tokenizer.token_to_id
        self.bos_id = tid(bos_token) if bos_token else None
        self.eos_id = tid(eos_token) if eos_token else None
        if tid("<|start_header_id|>") is not None and tid("<|eot_id|>") is not None:
            self.chat_format = "llama3"
            turn_ends = ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"]
        elif tid("<|im_start|>") is not None and tid("<|im_end|>") is not None:
            self.chat_format = "chatml"
            turn_ends = ["<|im_end|>", "<|endoftext|>"]
        else:
            self.chat_format = None
            turn_ends = []
        ids = [tid(t) for t in turn_ends] + [self.eos_id, *extra_eos_ids]
        self.eot_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in ids if i is not None))
        pad = tid(pad_token) if pad_token else None
        if pad is None:
            pad = tid("<|finetune_right_pad_id|>")
        self.pad_id = pad if pad is not None else self.eos_id
        # ChatML templates may insert a default system prompt; take it from the template text.
        found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", self.chat_template, re.DOTALL)
        self.default_system = found.group(1) if found and self.chat_format == "chatml" else None
        self.dated_system = "Cutting Knowledge Date" in self.chat_template

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ChatTokenizer":
        """From a Hub checkpoint folder: tokenizer.json (+ tokenizer_config.json, generation_config.json)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{folder} has no tokenizer.json: minilab needs the fast-tokenizer file of the checkpoint")
        tokenizer = Tokenizer.from_file(str(path))
        cfg = _read_json(folder / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        eos_ids = []
        for name in ("generation_config.json", "config.json"):
            eos = _read_json(folder / name).get("eos_token_id")
            eos_ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
        return cls(tokenizer, bos_token=_token_text(cfg.get("bos_token")), eos_token=_token_text(cfg.get("eos_token")),
                   pad_token=_token_text(cfg.get("pad_token")), chat_template=template, extra_eos_ids=eos_ids)

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "ChatTokenizer":
        """Rebuild a byte-level BPE tokeniser from a GGUF's `tokenizer.*` metadata.

        The file stores tokens already spelled in GPT-2's byte alphabet ("Ġthe" for " the"), the
        merges as "a b" strings, and a type per token; type 3 (control) tokens such as `<|im_end|>`
        become special added tokens so they are matched whole in text and skipped when decoding.
        """
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"GGUF tokenizer.ggml.model={kind!r} is not supported: minilab rebuilds byte-level BPE "
                "('gpt2') tokenisers only; use the model's Hub folder with its tokenizer.json"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {tok: i for i, tok in enumerate(tokens)}
        if "tokenizer.ggml.merges" not in meta:
            raise ValueError("this GGUF's byte-level tokenizer has no tokenizer.ggml.merges: the file is incomplete")
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        pre = meta.get("tokenizer.ggml.pre", "default")
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                         ignore_merges=pre in ("llama3", "llama-v3", "llama-bpe"))
        tokenizer = Tokenizer(bpe)
        tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(pre)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                      for t, ty in zip(tokens, types) if ty == 3])
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                              for t, ty in zip(tokens, types) if ty == 4])

        def token(key):
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos = token("bos_token_id")
        if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
            tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
        return cls(tokenizer, bos_token=bos, eos_token=token("eos_token_id"), pad_token=token("padding_token_id"),
                   chat_template=meta.get("tokenizer.chat_template"))

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        tok = self.tokenizer.id_to_token
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok(self.bos_id) if self.bos_id is not None else None,
            "eos_token": tok(self.eos_id) if self.eos_id is not None else None,
            "pad_token": tok(self.pad_id) if self.pad_id is not None else None,
            "add_bos_token": self.tokenizer.post_processor is not None,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 30,
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))

    # -- text <-> ids ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Ids of `text`; special tokens written in the text (e.g. "<|eot_id|>") map to their ids.

        add_special runs the checkpoint's post-processor (LLaMA-3 prepends <|begin_of_text|>), but
        never doubles a BOS that the text already starts with.
        """
        ids = self.tokenizer.encode(text, add_special_tokens=add_special).ids
        if add_special and self.bos_id is not None and ids[:2] == [self.bos_id, self.bos_id]:
            ids = ids[1:]
        return ids

    def encode_batch(self, texts: list[str], add_special: bool = False) -> list[list[int]]:
        return [self.encode(t, add_special) for t in texts]  # kept simple: the Rust side is fast anyway

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    # -- chat ----------------------------------------------------------------------------------

    def apply_chat(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                   date_string: str | None = None):
        """The conversation as the model's chat template writes it: a string, or ids if `tokenize`.

        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
        date_string: the "Today Date" of LLaMA-3.1/3.2's system block (default `LLAMA3_DATE`, fixed:
            transformers would write today's date, which changes the prompts, and so a seeded run's
            tokens, from one day to the next).
        """
        if self.chat_format == "llama3":
            text = self._llama3(messages, add_generation_prompt, date_string)
        elif self.chat_format == "chatml":
            text = self._chatml(messages, add_generation_prompt)
        else:
            raise ValueError(
                "this tokenizer has neither LLaMA-3 (<|start_header_id|>) nor ChatML (<|im_start|>) "
                "special tokens, so it has no chat format: use an instruct checkpoint"
            )
        return self.encode(text, add_special=False) if tokenize else text

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                 date_string: str | None = None) -> list[int]:
        """The exact ids of the chat template (no extra BOS: the template writes its own)."""
        return self.apply_chat(messages, add_generation_prompt, tokenize=True, date_string=date_string)

    def _llama3(self, messages, add_generation_prompt, date_string):
        bos = self.tokenizer.id_to_token(self.bos_id) if self.bos_id is not None else "<|begin_of_text|>"
        out = [bos]

        def turn(role, content):
            out.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>")

        if self.dated_system:  # LLaMA-3.1/3.2: a system block always comes first
            system = ""
            if messages and messages[0]["role"] == "system":
                system, messages = messages[0]["content"].strip(), messages[1:]
            date = date_string or LLAMA3_DATE
            turn("system", f"Cutting Knowledge Date: {LLAMA3_KNOWLEDGE_CUTOFF}\nToday Date: {date}\n\n{system}")
        for m in messages:
            turn(m["role"], m["content"].strip())  # the template trims each message
        if add_generation_prompt:
            out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return "".join(out)

    def _chatml(self, messages, add_generation_prompt):
        out = []
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            out.append(f"<|im_start|>system\n{self.default_system}<|im_end|>\n")
        for m in messages:
            out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
