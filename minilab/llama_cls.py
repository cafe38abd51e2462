"""A LLaMA with a classification head: transformers' `LlamaForSequenceClassification`, by hand.

The decoder reads the whole prompt, and the final hidden state of its last real token goes
through one (D -> K) linear layer, `score`: K label logits from one forward pass. There are no
answer words to score and nothing to generate, and softmax gives real probabilities. This is
how rasbt's LLMs-from-scratch turns GPT-2 into a classifier (its last token), and what
transformers builds for `AutoModelForSequenceClassification` on a LLaMA checkpoint.

Why the last token: in a causal decoder only the last position has seen every token of the
text. With left padding it is the last column; with right padding it is each row's last real
token. `last_real_index` finds it from the attention mask for either side. (transformers finds it
from `pad_token_id`, the rightmost token that is not padding, which is the same position when
no real token has the pad id.)

The names mirror transformers (`model.layers.3.self_attn.q_proj`, `score`), so a PEFT adapter
trained here, with the head saved beside the LoRA tensors (`modules_to_save=["score"]`,
`minilab.peft_io`), loads onto transformers' model and gives the same logits.

Shapes: B batch, T tokens, D hidden size, K labels.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .llama import KVCache, LlamaConfig, LlamaForCausalLM, LlamaModel


def last_real_index(attention_mask: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """(B,) column of each row's last real token (mask 1), left or right padded."""
    if attention_mask is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=device)
    cols = torch.arange(T, device=device)  # (T,)
    return (cols * attention_mask.long()).argmax(-1)  # the largest column with mask 1


class LlamaForSequenceClassification(nn.Module):
    """The decoder stack (`model`, shared with a causal LM) and a K-way head on the last real token."""

    modules_to_save = ("score",)  # trained in full, saved with the LoRA adapter (minilab.peft_io)
    peft_task_type = "SEQ_CLS"

    def __init__(self, config: LlamaConfig, num_labels: int, model: LlamaModel | None = None):
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"a classification head needs at least 2 labels, got {num_labels}")
        self.config, self.num_labels = config, num_labels
        self.model = model if model is not None else LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, num_labels, bias=False)

    @classmethod
    def from_causal_lm(cls, lm: LlamaForCausalLM, num_labels: int) -> "LlamaForSequenceClassification":
        """The same decoder (its weights and any LoRA layers, not copied) with a new head instead of
        `lm_head`: normal(0, 0.02) as transformers initialises it, in fp32 (it trains in full)."""
        head = cls(lm.config, num_labels, model=lm.model)
        nn.init.normal_(head.score.weight, std=0.02)
        head.score.to(device=lm.lm_head.weight.device, dtype=torch.float32)
        if hasattr(lm, "lora_config"):  # apply_lora's record, which save_adapter writes
            head.lora_config = lm.lora_config
        return head

    # The two methods `scoring.prefill` uses, so that the shared-prefix prefill works here too.
    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        return self.model(input_ids, attention_mask, position_ids, cache)  # (B, T, D)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """(B, D) last-token states -> (B, K) logits, in the head's dtype (fp32 unless autocast says otherwise)."""
        return self.score(h.to(self.score.weight.dtype))

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """(B, K) logits. attention_mask: (B, T), 1 = real token, 0 = padding (left or right)."""
        B, T = input_ids.shape
        h = self.model(input_ids, attention_mask, position_ids)  # (B, T, D)
        last = last_real_index(attention_mask, B, T, input_ids.device)  # (B,)
        return self.head(h[torch.arange(B, device=h.device), last])  # (B, K)


def prompt_logits(model: LlamaForSequenceClassification, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                  prefix_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K) logits of LEFT-padded prompts after a shared prefix that is run once (as DPO's scoring
    runs it): the same as `model(prefix + prompt)` row by row, with the prefix's work done once."""
    from .scoring import prefill, run_prefix

    prefix = None if prefix_ids is None else run_prefix(model, prefix_ids)
    return model.head(prefill(model, prompt_ids, prompt_mask, prefix).h_last)
