"""Token-by-token generation with the KV cache: one decoding loop, batched or streamed.

The prompt is run once (prefill), filling the cache with its keys and values; each new token
then costs one forward pass over a single position. `decode` is that loop, for a batch of
prompts: pick a token per row from the logits, run the new column through the model, repeat,
until every row has said a stop id. Two callers share it:

* `greedy_continue`: batched greedy decoding from prompts already prefilled for scoring
  (`scoring.prefill`), which is how `lmclassifier.classify` generates its short answers;
* `iter_token_ids` (and `generate_ids`, `stream_generate`): one prompt, yielding each token as
  it comes, greedy at temperature 0, otherwise nucleus (top-p) sampling from
  softmax(logits / temperature).

Streaming text needs care because tokens are not characters: a byte-level BPE token can hold half
of a UTF-8 character (an emoji is often split in two), and decoding it alone gives U+FFFD. We
decode a small window of recent tokens and only emit text once it no longer ends in U+FFFD.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch

if TYPE_CHECKING:
    from minilab.llama import KVCache
    from minilab.scoring import Prefilled


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> int:
    """Pick the next id from (V,) logits: argmax at temperature 0, else top-p sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token is always kept)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def decode(model, logits: torch.Tensor, cache: KVCache, max_new: int, pick: Callable[[torch.Tensor], torch.Tensor],
           stop_ids: Iterable[int] = (), mask: torch.Tensor | None = None,
           pos: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yield (B,) new token ids, one step at a time: the decoding loop every generator here uses.

    logits (B, V): what each prompt's last token predicts. cache: the prompts' keys and values;
    each step appends one column to it, in place. pick: (B, V) logits -> (B,) ids on their device.
    Left-padded rows also need `mask` (B, S), the attention mask over the cached columns (grown by
    one real column per step), and `pos` (B, 1), each row's next position; without padding the
    cache's length is the position and plain causal attention needs no mask. Decoding ends after
    `max_new` steps, or once every row has said a stop id (that step is yielded).

    A row that has said a stop id leaves the batch: its cache rows (and mask and position) are
    dropped, and the steps after yield `stop_ids`' first id for it, which callers cut with the
    rest of the row. A few rambling answers then cost a few rows' forward passes, not the whole
    batch's; the rows still decoding compute what they computed before, bar rounding (the batch is
    smaller). The cache is changed in place: it belongs to the decoding once this starts.
    """
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=logits.device)
    B = logits.shape[0]
    if max_new > 1:  # steps after the first append a column each: in place, not by copying the cache
        cache.reserve(max_new - 1)
    rows = torch.arange(B, device=logits.device)  # the original row of each row still decoding
    filler = int(stops[0]) if len(stops) else 0
    for step in range(max_new):
        tok = pick(logits)  # (A,) for the A rows still decoding
        if len(rows) == B:
            yield tok
        else:
            yield torch.full((B,), filler, dtype=tok.dtype, device=tok.device).index_copy(0, rows, tok)  # (B,)
        done = torch.isin(tok, stops)
        if step == max_new - 1 or bool(done.all()):
            return
        if bool(done.any()):  # drop the rows that have ended
            keep = (~done).nonzero().squeeze(1)  # (A',)
            cache.select_rows(keep)
            rows, tok = rows[keep], tok[keep]
            mask = None if mask is None else mask[keep]
            pos = None if pos is None else pos[keep]
        if mask is None:
            logits = model(tok[:, None], cache=cache)[:, -1]  # (B, V)
        else:
            mask = torch.cat([mask, torch.ones_like(tok)[:, None]], dim=1)  # (B, S + 1)
            logits = model(tok[:, None], attention_mask=mask, position_ids=pos, cache=cache)[:, -1]  # (B, V)
            pos = pos + 1


@torch.no_grad()
def greedy_continue(model, state: Prefilled, max_new: int, stop_ids) -> list[list[int]]:
    """Greedy decoding from prefilled prompts (`scoring.prefill`), each row cut at its first stop id.

    The first new token comes from the prompts' last hidden state, so nothing is recomputed.
    Each step appends one column to `state.cache` (in place); decoding ends after `max_new`
    tokens or as soon as every row has said a stop id (short label answers usually do in 2).
    """
    B = state.h_last.shape[0]
    if max_new <= 0:
        return [[] for _ in range(B)]
    logits = model.lm_head(state.h_last)  # (B, V): what the last prompt token predicts
    steps = decode(model, logits, state.cache, max_new, pick=lambda lg: lg.float().argmax(-1), stop_ids=stop_ids,
                   mask=state.mask, pos=state.next_pos[:, None])
    gen = torch.stack(list(steps), dim=1).tolist()  # (B, steps)
    stop_set = set(stop_ids)
    return [row[: next((k for k, t in enumerate(row) if t in stop_set), len(row))] for row in gen]


@torch.inference_mode()
def iter_token_ids(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int | None = None, stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield new token ids one at a time; a stop id is yielded and then generation ends."""
    ids = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("the prompt is empty: generation needs at least one token to condition on")
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    cache = model.new_cache()
    logits = model(ids[None].to(device), cache=cache)[:, -1]  # prefill: (1, V) at the last prompt position

    def pick(lg: torch.Tensor) -> torch.Tensor:
        return torch.tensor([sample_next(lg[0], temperature, top_p, generator)], device=device)

    for tok in decode(model, logits, cache, max_new_tokens, pick, stop_ids):
        yield int(tok)


def generate_ids(model, tokenizer, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> list[int]:
    """The new ids (without the prompt); ends with the end-of-turn id if the model produced one."""
    stop = tokenizer.eot_ids if tokenizer is not None else ()
    return list(iter_token_ids(model, prompt_ids, max_new_tokens, temperature, top_p, seed, stop))


def stream_generate(model, tokenizer, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
    """Yield pieces of the answer text as soon as they are stable; stops at an end-of-turn id.

    `prefix` and `read` index the generated ids: text of ids[prefix:read] has been emitted already.
    Decoding ids[prefix:] (rather than the newest token alone) keeps context such as a leading
    space, which some decoders drop at the start of a string, and completes split characters.
    """
    ids: list[int] = []
    prefix = read = 0
    stop = set(tokenizer.eot_ids)
    for token in iter_token_ids(model, prompt_ids, max_new_tokens, temperature, top_p, seed, stop):
        if token in stop:
            break
        ids.append(token)
        seen = tokenizer.decode(ids[prefix:read], skip_special=True)
        text = tokenizer.decode(ids[prefix:], skip_special=True)
        if len(text) > len(seen) and not text.endswith("\ufffd"):
            yield text[len(seen):]
            prefix, read = read, len(ids)
    tail = tokenizer.decode(ids[prefix:], skip_special=True)[len(tokenizer.decode(ids[prefix:read], skip_special=True)):]
    if tail:  # whatever was held back, e.g. a character cut off by max_new_tokens
        yield tail
