"""The one keyword transformers renamed under us: the KV cache argument (`past_key_values` up to 5.23, `cache` from
5.24). Resolved per model class from its `forward` signature, so a model that still takes `past_key_values` gets it;
passing the other name would land in `**kwargs` and be ignored silently."""

from __future__ import annotations

import dataclasses
import functools
import inspect

from transformers.generation.utils import GenerateDecoderOnlyOutput


@functools.cache
def _cache_kwarg_of(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument of `model.forward`: "cache" (transformers >= 5.24) or "past_key_values"."""
    return _cache_kwarg_of(type(model))


def prompt_cache(model_kwargs: dict):
    """The cache `generate()` prepared for the decoding method, under whichever name this transformers uses."""
    cache = model_kwargs.get("cache")
    return cache if cache is not None else model_kwargs.get("past_key_values")


_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)}
_OUTPUT_CACHE_FIELD = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"


def decoder_output(sequences, cache) -> GenerateDecoderOnlyOutput:
    """`GenerateDecoderOnlyOutput` with its cache field set, whatever it is called in this transformers."""
    return GenerateDecoderOnlyOutput(sequences=sequences, **{_OUTPUT_CACHE_FIELD: cache})


def config_value(config, name: str):
    """`config.<name>`, or None where it is missing or, in per-layer configs (Gemma 4), ambiguous."""
    try:
        return getattr(config, name, None)
    except Exception:  # transformers refuses a global read of a per-layer attribute with its own error type
        return None
