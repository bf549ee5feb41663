"""Which targets the engine serves: every check that refuses a target before the first round, in one place.

A refusal is an :class:`UnsupportedTargetError` (a ``ValueError``) with one line naming the model, what it has that
tree verification cannot serve, and what to use instead. ``LongSpecDraftModel.from_target`` / ``bind`` and
``SelfDraft`` raise it, so ``generate()`` never starts a round on such a model.

The last check is a probe: one verification forward over a two-node tree after a one-token prefix, through the
hybrid attention, exactly as a round runs it. It proves that every attention layer receives the verification's
arguments (a family that does not forward them to its attention function would silently attend densely), that the
attention function implements every input the family passes (see ``attention.check_attention_inputs``) and that the
family's cache and forward accept a verification at all. It runs once per target object.
"""

from __future__ import annotations

import threading
import weakref

import torch
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
_probed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_probe = threading.local()  # set while this thread runs a probe forward (see record_probe_call)


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


def check_supported_target(target: PreTrainedModel, probe: bool = True) -> None:
    """Refuse targets the engine cannot verify trees on, with the fix in the message (see the module docstring)."""
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
    if probe and target not in _probed:
        _probed[target] = probe_verification(target)


def last_layer_kv_geometry(target: PreTrainedModel) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """`((key heads, key dim), (value heads, value dim))` of the target's last cached layer, as the probe found it
    (None before the probe ran): what a LongSpec draft's cross-attention reads."""
    return _probed.get(target)


def record_probe_call(tree_call: bool) -> None:
    """Called by the attention function for every layer: counts, during a probe, calls with / without the
    verification's arguments."""
    counts = getattr(_probe, "counts", None)
    if counts is not None:
        counts[tree_call] += 1


def probe_verification(target: PreTrainedModel) -> tuple[tuple[int, int], tuple[int, int]]:
    """One verification forward on a two-node tree (see the module docstring); refuses the target if it fails.
    Returns the last cached layer's `((key heads, key dim), (value heads, value dim))`."""
    from .cache import PreallocatedCache
    from .compat import cache_kwarg
    from .tree import DraftTree
    from .verify import TargetState, verify_tree

    name = type(target).__name__
    device = target.device
    vocab = text_config(target.config).vocab_size
    tokens = torch.tensor([[min(1, vocab - 1), min(2, vocab - 1)]], device=device)  # prefix token, then the root
    tree = DraftTree(
        tokens=torch.tensor([[tokens[0, 1], min(3, vocab - 1)]], device=device),
        parents=torch.tensor([[-1, 0]], device=device),
        depths=torch.tensor([0, 1], device=device),
        ancestors=torch.tensor([[[True, False], [True, True]]], device=device),
        logprobs=torch.zeros(1, 2, device=device),
    )
    cache = PreallocatedCache(8)
    _probe.counts = {True: 0, False: 0}
    try:
        with torch.no_grad():
            target(input_ids=tokens[:, :1], position_ids=torch.zeros(1, 1, dtype=torch.long, device=device),
                   use_cache=True, **{cache_kwarg(target): cache})
            state = TargetState(cache=cache, valid=None, slot_positions=torch.zeros(1, 1, dtype=torch.long,
                                                                                   device=device),
                                next_positions=torch.ones(1, dtype=torch.long, device=device))
            verify_tree(target, state, tree)
        counts = _probe.counts
        keys, values = cache.layers[-1].keys, cache.layers[-1].values
    except UnsupportedTargetError:
        raise
    except Exception as err:  # noqa: BLE001 - the family's own code refusing a verification forward
        if _probe.counts[False]:
            raise _no_kwargs_error(name, _probe.counts) from err
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise UnsupportedTargetError(
            f"{name} cannot run a tree-verification forward ({type(err).__name__}: {first}); use a decoder-only "
            "causal LM whose forward takes a 4D attention mask, explicit position_ids and a DynamicCache."
        ) from err
    finally:
        _probe.counts = None
    if counts[False] or not counts[True]:
        raise _no_kwargs_error(name, counts)
    return (keys.shape[1], keys.shape[-1]), (values.shape[1], values.shape[-1])


def _no_kwargs_error(name: str, counts: dict) -> UnsupportedTargetError:
    return UnsupportedTargetError(
        f"{name}'s layers do not pass the forward's keyword arguments on to their attention function "
        f"({counts[False]} of {counts[True] + counts[False]} attention calls lacked them), so tree verification "
        "cannot reach them; use a causal LM whose attention layers forward **kwargs (e.g. Llama, Qwen3, Mistral, "
        "Gemma 3)."
    )
