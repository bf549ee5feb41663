"""Which targets the engine serves: every check that refuses a target before the first round, in one place.

A refusal is an :class:`UnsupportedTargetError` (a ``ValueError``) with one line naming the model, what it has that
tree verification cannot serve, and what to use instead. ``LongSpecDraftModel.from_target`` / ``bind`` and
``SelfDraft`` raise it, so ``generate()`` never starts a round on such a model.

What a config cannot tell, a probe tests (:mod:`~longspec_hf.probe`, the last check before the first round); this
module holds the checks it needs no forward for, and the count the attention function keeps for the probe.
"""

from __future__ import annotations

import threading

from transformers import PreTrainedModel


class UnsupportedTargetError(ValueError):
    """The target cannot take a tree verification (or a draft) as it is; the message says why and what to use."""


FULL, SLIDING = "full_attention", "sliding_attention"
# Layer kinds tree verification cannot serve, and why (the part of the message after the model's name).
UNSUPPORTED_LAYERS = {
    "linear_attention": "linear-attention layers, whose recurrent state cannot be rolled back to a tree's accepted "
                        "path",
    "mamba": "state-space (Mamba) layers, whose recurrent state cannot be rolled back to a tree's accepted path",
    "conv": "convolution-state layers, whose state cannot be rolled back to a tree's accepted path",
    "recurrent": "recurrent layers, whose state cannot be rolled back to a tree's accepted path",
    "hybrid": "hybrid recurrent/attention layers, whose state cannot be rolled back to a tree's accepted path",
    "chunked_attention": "chunked-attention layers, whose chunk masks tree verification does not build",
}
probe_calls = threading.local()  # set while this thread runs a probe forward (see record_probe_call)


def text_config(config):
    return config.get_text_config(decoder=True)


def layer_kinds(config) -> list[str]:
    """The target's layer kinds as its config declares them (`layer_types`, or one kind from `sliding_window` /
    `attention_chunk_size`)."""
    text = text_config(config)
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        return list(layer_types)
    for name in ("layers_block_type", "block_types", "layer_block_types", "hybrid_override_pattern"):
        declared = getattr(text, name, None)
        if declared:
            return [str(kind) for kind in declared]
    if getattr(text, "attention_chunk_size", None) is not None:
        return ["chunked_attention"]
    return [SLIDING if getattr(text, "sliding_window", None) is not None else FULL]


def unsupported_layers(config) -> str | None:
    """Why the layer kinds rule tree verification out, or None."""
    for kind in dict.fromkeys(layer_kinds(config)):
        if kind in (FULL, SLIDING, "attention"):
            continue
        return UNSUPPORTED_LAYERS.get(kind, f"layers of kind {kind!r}, which tree verification does not serve")
    return None


def check_declared_support(target: PreTrainedModel) -> None:
    """Refuse targets whose config or class rules tree verification out, with the fix in the message (the probe of
    :mod:`~longspec_hf.probe` then tests what a config cannot tell)."""
    config = target.config
    name = type(target).__name__
    use = "use a decoder-only causal LM with attention layers only (e.g. Llama, Qwen3, Mistral, Gemma 3, gpt-oss)"
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedTargetError(f"{name} is an encoder-decoder model; LongSpec drafts work with decoder-only "
                                     "causal LMs.")
    why = unsupported_layers(config)
    if why is not None:
        raise UnsupportedTargetError(f"{name} has {why}; {use}.")
    if not getattr(target, "_supports_attention_backend", False):
        raise UnsupportedTargetError(f"{name} does not use transformers' AttentionInterface, which tree verification "
                                     f"needs; {use}.")


def record_probe_call(tree_call: bool) -> None:
    """Called by the attention function for every layer: counts, during a probe, calls with / without the
    verification's arguments."""
    counts = getattr(probe_calls, "counts", None)
    if counts is not None:
        counts[tree_call] += 1
