"""The one hook into transformers: the assisted-generation entry of ``GenerationMixin``, for LongSpec drafters.

``GenerationMixin.generate`` prepares everything (generation config, logits processors, stopping criteria, streamer,
attention mask, ``num_return_sequences`` expansion), validates the mode, and then calls the decoding method of the
mode. With ``assistant_model=...`` that is ``_assisted_decoding``: a hard-coded method with no registry for new
candidate generators, which verifies chains only, at batch size 1. The hook wraps the two places of that path:

* ``_assisted_decoding``: when ``assistant_model`` is a LongSpec drafter, the prepared arguments go to
  :func:`longspec_hf.generation.speculative_generate`;
* ``_validate_generation_mode``: for a drafter, refuse modes it cannot serve (beam search, ...) with a clear error
  instead of transformers silently ignoring the assistant, and lift the ``num_return_sequences == 1`` limit of
  transformers' own assisted decoding (the LongSpec loop handles batches).

For any other assistant, or none, both wrappers call the original methods unchanged, so plain ``generate()`` and
transformers' own assisted decoding behave exactly as before. The hook is version-guarded: it installs only when
both methods still take the arguments relied on here (checked by signature; tested with transformers 5.23 to 5.25);
otherwise importing ``longspec_hf`` warns and leaves transformers untouched.
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings

from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.utils import GenerationMixin

from .drafting import is_drafter

_EXPECTED = {
    "_assisted_decoding": ("input_ids", "logits_processor", "stopping_criteria", "generation_config", "streamer",
                           "assistant_model"),
    "_validate_generation_mode": ("generation_mode", "generation_config", "generation_mode_kwargs"),
}
_MARK = "__longspec_hook__"


def hook_is_compatible() -> bool:
    for method, names in _EXPECTED.items():
        params = inspect.signature(getattr(GenerationMixin, method)).parameters
        if not all(name in params for name in names):
            return False
    return True


def _wrap_assisted_decoding(original):
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

    return _assisted_decoding


def _wrap_validate_generation_mode(original):
    @functools.wraps(original)
    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        if not is_drafter(generation_mode_kwargs.get("assistant_model")):
            return original(self, generation_mode, generation_config, generation_mode_kwargs)
        # A draft made for another model must say so itself: transformers' own check (a vocabulary mismatch) would
        # first tell the user to pass an assistant_tokenizer, which cannot help a LongSpec draft.
        generation_mode_kwargs["assistant_model"].bind(self)
        if generation_mode != GenerationMode.ASSISTED_GENERATION:
            raise ValueError(
                f"A LongSpec draft supports greedy decoding and sampling, not {generation_mode.value}; set "
                "num_beams=1 (and no penalty_alpha, constraints or dola_layers), or drop assistant_model."
            )
        if generation_config.num_return_sequences > 1:
            # transformers' own assisted decoding is limited to one sequence; the LongSpec loop handles the
            # num_return_sequences-expanded batch like any other batch.
            generation_config = copy.copy(generation_config)
            generation_config.num_return_sequences = 1
        return original(self, generation_mode, generation_config, generation_mode_kwargs)

    return _validate_generation_mode


def install_generation_hook() -> bool:
    """Install the wrappers once; returns whether the hook is active."""
    if getattr(GenerationMixin._assisted_decoding, _MARK, False):
        return True
    if not hook_is_compatible():
        warnings.warn(
            "longspec_hf: this transformers version's GenerationMixin has unexpected signatures, so "
            "generate(assistant_model=draft) is not routed to LongSpec; install transformers>=5.23.",
            stacklevel=2,
        )
        return False
    for name, wrap in (("_assisted_decoding", _wrap_assisted_decoding),
                       ("_validate_generation_mode", _wrap_validate_generation_mode)):
        wrapped = wrap(getattr(GenerationMixin, name))
        setattr(wrapped, _MARK, True)
        setattr(GenerationMixin, name, wrapped)
    return True
