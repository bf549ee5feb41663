"""Loading a target causal LM and its tokenizer for the command line tools (hub id, folder or GGUF file)."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_causal_lm(name: str, gguf_file: str | None = None, dtype: str = "fp32", device: str | None = None,
                   attn_implementation: str | None = None, tokenizer: str | None = None):
    """`(target, tokenizer)` for a causal LM, frozen and in eval mode; refuses models without an LM head."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(DTYPES)}.")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        target = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype], **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ValueError(f"{name} has no causal LM head (AutoModelForCausalLM cannot load it); LongSpec drafts "
                             "are for causal LMs only.") from err
        raise
    if target.get_output_embeddings() is None:
        raise ValueError(f"{name} has no LM head; LongSpec drafts are for causal LMs only.")
    if device:
        target.to(device)
    target.requires_grad_(False).eval()
    tokenizer_kwargs = {"gguf_file": gguf_file} if gguf_file and not tokenizer else {}
    return target, AutoTokenizer.from_pretrained(tokenizer or name, **tokenizer_kwargs)
