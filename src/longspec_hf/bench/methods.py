"""Decoding methods the benchmark compares. A method is a name plus a greedy `generate` call; add your own by
building a :class:`Method` and passing it to :func:`~longspec_hf.bench.run_bench`.

Built in: plain ``generate()`` (the autoregressive baseline every speed-up is measured against), the same with a
static cache and transformers' compiled decoding (what a user would pick instead of a draft), transformers'
prompt-lookup decoding and early-exit (LayerSkip-style) assisted decoding, LongSpec with any tree shape, the
training-free self-speculative draft, and either of those with SpecPV partial verification.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..cache import kv_bytes
from ..compat import cache_kwarg
from ..tree import AUTO, tree_setting

BASELINE = "autoregressive"


@dataclass
class MethodOutput:
    """What one greedy generation returns: the sequences `[1, n + new]` and what only the method can observe."""

    sequences: torch.LongTensor
    draft_cache_bytes: int | None = None
    target_forwards: int | None = None  # None: counted by a hook on the target's last decoder layer
    tree_shapes: dict[str, int] | None = None  # under tree_shape="auto": rounds per tree chosen
    # under "auto": tokens of the draft's tree its acceptance model expected, and those accepted (the lookup branch's
    # accepted tokens apart: the model does not predict them)
    predicted_accepted: tuple[float, int] | None = None


@dataclass
class Method:
    """A decoding method under test.

    Attributes:
        name: column name in the results.
        generate: `(target, input_ids [1, n], prompt_cache, max_new_tokens) -> MethodOutput`, greedy. `prompt_cache`
            is a private copy of the KV of `input_ids[:, :-1]` when `uses_prompt_cache`, else None (then the method
            prefills itself and its decode time is its end-to-end time minus the prompt's measured prefill time).
        uses_prompt_cache: whether `generate` continues a prompt cache exactly.
        skip_reason: why the method cannot run here (it is then reported as skipped, never run).
        draft_cache_bytes: for methods whose draft state is not observable after the call, its size as a function
            of the prompt cache.
        prepare_cache: `(target, prompt_cache, input_ids, max_new_tokens) -> cache`, untimed, for methods that
            continue the prompt in another cache type; it must leave `prompt_cache` as it is. Default: a deep copy.
        warmup: "once" (one short untimed call before the run) or "per_context" (one full untimed call per context
            length, for methods whose first call at a new shape compiles).
        hook_forwards: count target forwards with a hook on its last layer. Methods that report them themselves
            turn it off: torch.compile traces such a hook and guards on its counter, recompiling every forward.
    """

    name: str
    generate: Callable[..., MethodOutput] | None
    uses_prompt_cache: bool = True
    skip_reason: str | None = None
    draft_cache_bytes: Callable | None = None
    settings: dict = field(default_factory=dict)
    prepare_cache: Callable | None = None
    warmup: str = "once"
    hook_forwards: bool = True


def greedy(target, input_ids: torch.LongTensor, max_new_tokens: int, cache=None, **kwargs) -> torch.LongTensor:
    """Exactly `max_new_tokens` greedy tokens (EOS does not stop generation, so every method decodes the same number;
    unlike `min_new_tokens`, this adds no logits processor, so each method runs as a user's plain greedy call),
    continuing `cache` if given. The mask is all ones: prompts are unpadded, and a prompt token equal to the pad id
    must not make generate() infer padding."""
    if cache is not None:
        kwargs[cache_kwarg(target)] = cache
    return target.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                           max_new_tokens=max_new_tokens, eos_token_id=None, **kwargs)


def autoregressive() -> Method:
    def generate(target, input_ids, cache, max_new_tokens):
        return MethodOutput(greedy(target, input_ids, max_new_tokens, cache=cache))

    return Method(BASELINE, generate)


def static_copy(target, prompt_cache, max_cache_len: int):
    """A transformers `StaticCache` of `max_cache_len` slots holding `prompt_cache`'s KV: what
    `generate(cache_implementation="static")` holds after its own prefill of the same tokens."""
    from transformers import StaticCache

    cache = StaticCache(config=target.config, max_cache_len=max_cache_len)
    for index, layer in enumerate(prompt_cache.layers):
        cache.update(layer.keys, layer.values, index)
    return cache


def compiled_static(target, compile: bool = True, name: str = "autoregressive_compiled") -> Method:
    """Plain greedy ``generate()`` the way transformers documents its compiled decoding: a static cache and a
    ``compile_config``, so generate() compiles the decode step itself (``torch.compile``, its default settings).

    The prompt's KV is copied into the static cache before timing, so the decode time is measured like the eager
    baseline's. Compilation happens in the first call at each cache size; the benchmark's per-context warm-up pays
    it. `compile=False` keeps the static cache but decodes eagerly (quick, for tests).
    """
    from transformers import CompileConfig

    config = CompileConfig()
    # generate() compiles on accelerators only; this switch of its own lets it compile on CPU too.
    config._compile_all_devices = True

    def prepare(target, prompt_cache, input_ids, max_new_tokens):
        return static_copy(target, prompt_cache, input_ids.shape[1] + max_new_tokens)

    def generate(target, input_ids, cache, max_new_tokens):
        options = {"compile_config": config} if compile else {"disable_compile": True}
        out = greedy(target, input_ids, max_new_tokens, cache=cache, **options)
        # One forward per new token (the prompt's last token, then each step); counted here, not by a layer hook
        # inside the compiled graph.
        return MethodOutput(out, target_forwards=max_new_tokens)

    settings = {"cache_implementation": "static", "compile_config": config.to_dict() if compile else None}
    return Method(name, generate, settings=settings, prepare_cache=prepare,
                  warmup="per_context" if compile else "once", hook_forwards=False)


# transformers 5.23's assisted decoding (prompt lookup, early exit, assistant models) does not continue a filled
# prompt cache correctly (its first token differs from plain decoding's), so those methods prefill themselves.


def prompt_lookup(num_tokens: int = 10) -> Method:
    def generate(target, input_ids, cache, max_new_tokens):
        out = greedy(target, input_ids, max_new_tokens, prompt_lookup_num_tokens=num_tokens)
        return MethodOutput(out, draft_cache_bytes=0)

    return Method("prompt_lookup", generate, uses_prompt_cache=False, settings={"prompt_lookup_num_tokens": num_tokens})


@contextlib.contextmanager
def quiet_assistant_config_warning():
    """Hide transformers' deprecation notice about `generation_config` passed with generation arguments while its
    own early-exit candidate generator makes that call to draft (the bench passes plain arguments); it is about
    transformers' code, not the user's."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passing `generation_config` together with generation-related")

    logger = logging.getLogger("transformers.generation.utils")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def early_exit(target, layer: int | None = None) -> Method:
    """transformers' early-exit assisted decoding: the target's first `layer` layers and its LM head draft. Only
    models trained for early exit (LayerSkip) draft well this way; on others it shows the cost of a poor draft."""
    from .measure import decoder_layers

    layers = decoder_layers(target)
    if layers is None:
        return Method("early_exit", None, skip_reason="the target exposes no decoder layer stack")
    layer = layer or max(1, len(layers) // 4)
    if not 1 <= layer < len(layers):
        return Method("early_exit", None, skip_reason=f"exit layer {layer} is not inside the {len(layers)}-layer "
                                                      "target")

    def generate(target, input_ids, cache, max_new_tokens):
        with quiet_assistant_config_warning():
            return MethodOutput(greedy(target, input_ids, max_new_tokens, assistant_early_exit=layer))

    return Method("early_exit", generate, uses_prompt_cache=False,
                  draft_cache_bytes=lambda prompt_cache: kv_bytes(prompt_cache, layers=layer),
                  settings={"assistant_early_exit": layer})


def speculative(draft, tree_shape: list[int] | str | None, name: str, specpv: dict | None = None,
                lookup: int | None = None, compile_rounds: bool = False) -> Method:
    """Any drafter of this package (LongSpec draft, SelfDraft) with its own ``generation_config`` as it is, except
    for what is given: a tree shape ("auto": chosen per round), a prompt-lookup branch of `lookup` tokens on every
    tree (0: none), SpecPV partial verification settings (approximate: its `identical` column may say no), compiled
    rounds (``compile_config=CompileConfig()``). With none of them the method is the drafter's own defaults."""
    config = draft.generation_config
    changes = {}
    if tree_shape is not None:  # [] is a shape too: rounds without a tree
        setting = tree_setting(tree_shape)
        changes["tree_shape"] = setting if setting == AUTO else list(setting)
    if lookup is not None:
        changes["prompt_lookup_num_tokens"] = lookup
    if specpv:
        changes["specpv"] = specpv
    options = {}
    if compile_rounds:
        from transformers import CompileConfig

        options["compile_config"] = CompileConfig()

    def generate(target, input_ids, cache, max_new_tokens):
        saved = {key: getattr(config, key, None) for key in changes}
        for key, value in changes.items():
            setattr(config, key, value)
        try:
            out = greedy(target, input_ids, max_new_tokens, cache=cache, assistant_model=draft, **options)
        finally:
            for key, value in saved.items():
                setattr(config, key, value)
        # Verification rounds + the forward of the prompt's last token (the prompt cache holds all but that one).
        stats = draft.stats
        return MethodOutput(out, draft_cache_bytes=stats.draft_cache_bytes, target_forwards=stats.rounds + 1,
                            tree_shapes=dict(stats.tree_shapes) or None,
                            # The prediction covers the draft's tree only: the lookup branch's tokens are not in it.
                            predicted_accepted=(stats.predicted_accepted,
                                                stats.accepted_tokens - stats.lookup_accepted_tokens)
                            if stats.tree_shapes else None)

    # What the method runs, its changes over the drafter's own settings included, as results.json reports it.
    shape = changes.get("tree_shape", tree_setting(getattr(config, "tree_shape", None)))
    shape = shape if shape == AUTO else list(shape)
    branch = changes.get("prompt_lookup_num_tokens", getattr(config, "prompt_lookup_num_tokens", None) or 0)
    settings = {"tree_shape": shape, **({"specpv": specpv} if specpv else {}),
                **({"prompt_lookup_num_tokens": branch} if branch else {}),
                **({"compile_rounds": True} if compile_rounds else {}),
                "changed": sorted(changes) + (["compile_config"] if compile_rounds else [])}
    # "auto" times a few forwards the first time it meets a context length (then reuses them), and compiled rounds
    # may compile a graph there: warm up per context, so the timed calls show the steady state; the measuring cost
    # is reported by the decode loop's stats.
    per_context = shape == AUTO or compile_rounds
    return Method(name, generate, settings=settings, warmup="per_context" if per_context else "once",
                  hook_forwards=False)


DRAFT_DEFAULTS = "longspec"  # the method that runs the draft as it comes: its own generation_config, unchanged


def longspec(draft, tree_shape: list[int] | str | None = None, name: str = DRAFT_DEFAULTS,
             specpv: dict | None = None, lookup: int | None = None, compile_rounds: bool = False) -> Method:
    """LongSpec with `draft`: its own ``generation_config`` (tree shape, prompt-lookup branch, ...) except for what
    is given (see :func:`speculative`)."""
    if draft is None:
        return Method(name, None, skip_reason="no LongSpec draft given (--draft)")
    return speculative(draft, tree_shape, name, specpv, lookup, compile_rounds)


def self_draft(target, tree_shape: list[int] | str | None = None, sink_size: int = 4, window_size: int = 512,
               name: str = "self_draft", specpv: dict | None = None, attn_backend: str = "auto") -> Method:
    """The training-free self-speculative draft (the target over a sink + window view of its KV cache)."""
    from ..self_draft import SelfDraft

    try:
        draft = SelfDraft.from_target(target, sink_size=sink_size, window_size=window_size)
    except ValueError as err:
        return Method(name, None, skip_reason=str(err))
    draft.generation_config.tree_attn_backend = attn_backend
    method = speculative(draft, tree_shape, name, specpv)
    method.settings.update(sink_size=draft.sink_size, window_size=draft.window_size)
    return method


def specpv_settings(budget_tokens: int, block_size: int = 16) -> dict:
    """SpecPV settings retrieving `budget_tokens` per layer and KV head (other settings: the paper's defaults)."""
    return {"block_size": block_size, "retrieval_blocks": max(budget_tokens // block_size, 0)}


def lookup_variant_name(name: str, length: int) -> str:
    return f"{name}_nolookup" if length == 0 else f"{name}_pl{length}"


def default_methods(target, draft=None, trees: dict[str, list[int] | str] | None = None,
                    early_exit_layer: int | None = None, prompt_lookup_tokens: int = 10,
                    self_draft_tree: list[int] | str | None = AUTO,
                    self_draft_window: int = 512, specpv_budgets: list[int] = (),
                    attn_backend: str = "auto", compiled: bool = False,
                    lookup_branches: list[int] = (), compile_rounds: bool = False) -> list[Method]:
    """The baseline, with `compiled` its static-cache compiled variant, transformers' prompt lookup and early exit,
    LongSpec as the draft comes (``longspec``: its own ``generation_config``, e.g. ``tree_shape="auto"`` and the
    shipped SmolLM2 draft's 6-token lookup branch) and with each tree shape of `trees` instead of its own (name ->
    shape; default a chain and the beam tree, each keeping the draft's other settings), every one of those again
    with a prompt-lookup branch of each length in `lookup_branches` (`<name>_pl<L>`; 0 turns the branch off:
    `<name>_nolookup`), with `compile_rounds` again with compiled rounds (`<name>_compiled`), the self-speculative
    draft (unless `self_draft_tree` is None), and per SpecPV budget (tokens) ``longspec`` with partial verification
    (the self-draft when there is no LongSpec draft)."""
    trees = trees if trees is not None else {"longspec_chain": [1, 1, 1], "longspec_tree": [4, 16, 16, 16, 16]}
    variants = {DRAFT_DEFAULTS: None, **trees}
    methods = [autoregressive()] + ([compiled_static(target)] if compiled else [])
    methods += [prompt_lookup(prompt_lookup_tokens), early_exit(target, early_exit_layer)]
    methods += [longspec(draft, shape, name) for name, shape in variants.items()]
    methods += [longspec(draft, shape, lookup_variant_name(name, length), lookup=length)
                for length in lookup_branches for name, shape in variants.items()]
    if compile_rounds:
        methods += [longspec(draft, shape, f"{name}_compiled", compile_rounds=True)
                    for name, shape in variants.items()]
    if self_draft_tree is not None:
        methods.append(self_draft(target, self_draft_tree, window_size=self_draft_window,
                                  attn_backend=attn_backend))
    for budget in specpv_budgets:
        if draft is not None:
            methods.append(longspec(draft, None, f"{DRAFT_DEFAULTS}_pv{budget}", specpv_settings(budget)))
        else:
            methods.append(self_draft(target, self_draft_tree or AUTO, window_size=self_draft_window,
                                      name=f"self_draft_pv{budget}", specpv=specpv_settings(budget),
                                      attn_backend=attn_backend))
    return methods
