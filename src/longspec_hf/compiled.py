"""Compiled rounds (opt-in): the draft's level forward and the target's verification forward through `torch.compile`.

Turned on the way transformers turns on compiled decoding: a ``compile_config``
(:class:`transformers.CompileConfig`) passed to ``generate`` or set on the draft's ``generation_config``;
``disable_compile=True`` wins. The prefill and everything outside the two forwards stay eager.

Why the config is adapted rather than used as given:

* **dynamic shapes**: a round's verification reads a prefix that grows every round and a tree whose size varies
  (``tree_shape="auto"``, prompt-lookup branches), so the forwards are compiled with ``dynamic=True``: one graph
  serves every context and tree size (sizes 0 and 1 are specialised by torch, so a few graphs in all);
* **no CUDA graphs**: ``mode="reduce-overhead"`` (transformers' default) captures one CUDA graph per distinct shape,
  which a growing prefix would re-record every round; the modes that capture are replaced by their counterparts that
  do not (``"default"``, ``"max-autotune-no-cudagraphs"``).

* **recompiles isolated per model**: torch caps the graphs kept per *code object* (``recompile_limit``, 8 by
  default) and, by default, counts every ``torch.compile`` of the same function against one shared cap; every model
  of a family (and several families) runs through the same transformers code, so a process using several targets
  would exhaust it together. Each compiled call tracks its own graphs (``isolate_recompiles``, where torch has it).

Should torch still give up on a forward (its recompile limit hit: it then runs that forward eagerly, logging one
line), the loop says so with a :class:`CompiledFallbackWarning` naming the cause, rather than running slow in silence.

The compiled callables are kept on the model (as transformers keeps its own compiled call), so the compilation is
paid once per process and configuration, not per ``generate`` call. Compiled forwards compute the same function as
eager ones up to fp reordering; every emitted token still comes from the target's logits, so the loop's guarantees
(greedy = the target's own argmax, sampling from its own distribution) hold unchanged.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable

import torch
from transformers import CompileConfig, GenerationConfig

_CAPTURING_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
_ATTRIBUTE = "_longspec_compiled_calls"


def round_compile_config(generation_config: GenerationConfig, drafter) -> CompileConfig | None:
    """The `CompileConfig` rounds run under, or `None` (eager): the call's ``compile_config``, else the draft's;
    ``disable_compile=True`` (the call's or the draft's) turns compilation off."""
    draft_config = getattr(drafter, "generation_config", None)
    if getattr(generation_config, "disable_compile", False) or getattr(draft_config, "disable_compile", False):
        return None
    config = getattr(generation_config, "compile_config", None) or getattr(draft_config, "compile_config", None)
    if config is None:
        return None
    if isinstance(config, dict):  # a draft's generation_config.json stores it as a dict
        config = CompileConfig(**config)
    if not isinstance(config, CompileConfig):
        raise ValueError(f"compile_config must be a transformers.CompileConfig (or its dict), got {type(config)}; "
                         "e.g. generate(..., compile_config=CompileConfig()).")
    return config


def compile_options(config: CompileConfig) -> dict:
    """`torch.compile` keyword arguments for a round's forwards (see the module docstring)."""
    options = config.to_dict()
    options["dynamic"] = True
    # torch.compile takes a mode or options, not both (not even mode="default")
    options["mode"] = None if options.get("options") else _CAPTURING_MODES.get(options["mode"], options["mode"])
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:  # torch >= 2.13
        options["isolate_recompiles"] = True
    return options


def compiled_call(module: torch.nn.Module, config: CompileConfig) -> Callable:
    """`module.__call__` compiled for rounds under `config`, kept on the module and reused by later calls."""
    calls = module.__dict__.setdefault(_ATTRIBUTE, {})
    options = compile_options(config)
    key = repr(sorted(options.items(), key=lambda item: item[0]))
    if key not in calls:
        calls[key] = torch.compile(module.__call__, **options)
    return calls[key]


class CompiledFallbackWarning(UserWarning):
    """torch.compile gave up on a round's forward (its recompile limit hit) and runs it eagerly from then on."""


def fallback_count() -> int:
    """How many times, in this process, dynamo stopped compiling a frame because a recompile limit was hit (its own
    counters; the fallback itself only logs)."""
    from torch._dynamo.utils import counters

    return sum(n for message, n in counters["unimplemented"].items() if "recompile limit" in message.lower())


def warn_on_fallback(before: int) -> None:
    """Warn once per call when dynamo fell back to eager since `before` (a :func:`fallback_count`)."""
    if fallback_count() > before:
        limits = torch._dynamo.config
        warnings.warn(
            "Compiled rounds fell back to eager: torch hit its recompile limit (torch._dynamo.config.recompile_limit "
            f"= {limits.recompile_limit}, accumulated_recompile_limit = {limits.accumulated_recompile_limit}), so "
            "some forwards now run uncompiled and slower. Each new input shape the compiled graphs do not cover "
            "(a new dtype, device, batch size, model) compiles another graph; raise the limits, or generate without "
            "compile_config.", CompiledFallbackWarning, stacklevel=4)
