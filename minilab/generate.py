"""Token-by-token generation with the KV cache, and streaming of the decoded text.

The prompt is run once (prefill), filling the cache with its keys and values; each new token
then costs one forward pass over a single position. Sampling is greedy at temperature 0,
otherwise nucleus (top-p) sampling from softmax(logits / temperature).

Streaming text needs care because tokens are not characters: a byte-level BPE token can hold half
of a UTF-8 character (an emoji is often split in two), and decoding it alone gives U+FFFD. We
decode a small window of recent tokens and only emit text once it no longer ends in U+FFFD.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch


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
    stop = set(stop_ids)
    cache = model.new_cache()
    logits = model(ids[None].to(device), cache=cache)[0, -1]  # prefill: (V,) at the last prompt position
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)
        yield token
        if token in stop:
            return
        logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]


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
