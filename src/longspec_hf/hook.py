"""The one hook into transformers: route assisted decoding to the LongSpec loop when the assistant is a drafter.

``GenerationMixin.generate`` prepares everything (generation config, logits processors, stopping criteria, streamer,
attention mask) and then calls the decoding method of the generation mode. With ``assistant_model=...`` that is
``GenerationMixin._assisted_decoding``, a hard-coded method with no registry for new candidate generators, and one
that verifies chains only. We wrap exactly that method: when ``assistant_model`` is a LongSpec drafter the prepared
arguments go to :func:`longspec_hf.generation.speculative_generate`; otherwise the original method runs untouched, so
plain ``generate()`` and transformers' own assisted decoding behave exactly as before.

The wrap is version-guarded: it is installed only when ``_assisted_decoding`` still takes the arguments this module
relies on (checked by signature, tested against transformers 5.23); otherwise importing ``longspec_hf`` warns and
``generate(assistant_model=draft)`` raises a clear error from the draft instead of misbehaving.
"""

from __future__ import annotations

import functools
import inspect
import warnings

from transformers.generation.utils import GenerationMixin

from .drafting import is_drafter

_EXPECTED_PARAMETERS = ("input_ids", "logits_processor", "stopping_criteria", "generation_config", "streamer",
                        "assistant_model")
_MARK = "__longspec_hook__"


def hook_is_compatible() -> bool:
    params = inspect.signature(GenerationMixin._assisted_decoding).parameters
    return all(name in params for name in _EXPECTED_PARAMETERS)


def install_generation_hook() -> bool:
    """Install the wrap once; returns whether the hook is active."""
    original = GenerationMixin._assisted_decoding
    if getattr(original, _MARK, False):
        return True
    if not hook_is_compatible():
        warnings.warn(
            "longspec_hf: this transformers version's GenerationMixin._assisted_decoding has an unexpected "
            "signature, so generate(assistant_model=draft) is not routed to LongSpec; install transformers>=5.23.",
            stacklevel=2,
        )
        return False

    @functools.wraps(original)
    def _assisted_decoding(self, input_ids, logits_processor, stopping_criteria, generation_config, *args, **kwargs):
        assistant = kwargs.get("assistant_model")
        if not is_drafter(assistant):
            return original(self, input_ids, logits_processor, stopping_criteria, generation_config, *args, **kwargs)
        from .generation import speculative_generate

        if args:
            raise TypeError("longspec_hf expects generate() to pass decoding options by keyword.")
        kwargs.pop("assistant_model")
        for unused in ("synced_gpus", "inputs_tensor", "assistant_tokenizer", "tokenizer"):
            kwargs.pop(unused, None)
        return speculative_generate(
            self, input_ids, assistant, logits_processor, stopping_criteria, generation_config, **kwargs
        )

    setattr(_assisted_decoding, _MARK, True)
    GenerationMixin._assisted_decoding = _assisted_decoding
    return True
