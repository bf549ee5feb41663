"""The probe: the last check before a target's first round, one verification forward run exactly as a round runs it.

One forward over a two-node tree after a one-token prefix, through the hybrid attention. It proves that every
attention layer receives the verification's arguments (a family that does not forward them to its attention function
would silently attend densely), that the attention function implements every input the family passes (see
``attention.check_attention_inputs``) and that the family's cache and forward accept a verification at all. It runs
once per target object, after the declared checks of :mod:`~longspec_hf.support`, and records the geometry of the
last layer's cache, which a LongSpec draft cross-attends to.
"""

from __future__ import annotations

import weakref

import torch
from transformers import PreTrainedModel

from .cache import PreallocatedCache
from .compat import cache_kwarg
from .support import UnsupportedTargetError, check_declared_support, probe_calls, text_config
from .tree import DraftTree
from .verify import TargetState, verify_tree

_probed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_supported_target(target: PreTrainedModel, probe: bool = True) -> None:
    """Refuse targets the engine cannot verify trees on, with the fix in the message: the declared checks, then (once
    per target) the probe."""
    check_declared_support(target)
    if probe and target not in _probed:
        _probed[target] = probe_verification(target)


def last_layer_kv_geometry(target: PreTrainedModel) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """`((key heads, key dim), (value heads, value dim))` of the target's last cached layer, as the probe found it
    (None before the probe ran): what a LongSpec draft's cross-attention reads."""
    return _probed.get(target)


def probe_verification(target: PreTrainedModel) -> tuple[tuple[int, int], tuple[int, int]]:
    """One verification forward on a two-node tree (see the module docstring); refuses the target if it fails.
    Returns the last cached layer's `((key heads, key dim), (value heads, value dim))`."""
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
    probe_calls.counts = {True: 0, False: 0}
    try:
        with torch.no_grad():
            target(input_ids=tokens[:, :1], position_ids=torch.zeros(1, 1, dtype=torch.long, device=device),
                   use_cache=True, **{cache_kwarg(target): cache})
            state = TargetState(cache=cache, valid=None, slot_positions=torch.zeros(1, 1, dtype=torch.long,
                                                                                   device=device),
                                next_positions=torch.ones(1, dtype=torch.long, device=device))
            verify_tree(target, state, tree)
        counts = probe_calls.counts
        keys, values = cache.layers[-1].keys, cache.layers[-1].values
    except UnsupportedTargetError:
        raise
    except Exception as err:  # noqa: BLE001 - the family's own code refusing a verification forward
        if probe_calls.counts[False]:
            raise _no_kwargs_error(name, probe_calls.counts) from err
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise UnsupportedTargetError(
            f"{name} cannot run a tree-verification forward ({type(err).__name__}: {first}); use a decoder-only "
            "causal LM whose forward takes a 4D attention mask, explicit position_ids and a DynamicCache."
        ) from err
    finally:
        probe_calls.counts = None
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
