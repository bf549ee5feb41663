"""What one speculative round costs on this device, against one plain decode step (``longspec cost``).

Per context length L, on a random prompt of L tokens whose KV (all but the last token) is prefilled once:

* plain step: eager plain ``generate()`` continuing the prompt cache — ms per new token;
* speculative round, per drafter and tree shape: ``generate(assistant_model=draft)`` continuing the same cache — ms
  per verification round, and its parts (draft levels, verification forward, acceptance, commit, the rest of the
  loop) when the decode loop reports them (``draft.generation_config.profile_rounds``);
* break-even tau = round time / plain step time: the tokens per round a draft must average just to tie plain
  decoding. A draft whose tau on a tree is `tau` decodes `tau / break-even tau` times as fast as plain decoding;
* prefix-attention kernels: one layer's attention of q tree queries over the L-token prefix with its log-sum-exp,
  per backend, next to the q = 1 SDPA attention of a plain decode step.

Each generate() figure is a difference of two calls, of `short` and `short + rounds` new tokens: what a call pays
once (the prompt's last token, the draft's prefill, copying the prompt cache, the shallower trees of its last rounds)
cancels, leaving whole rounds (steps). A random draft has tau near 1, so a call of n tokens takes about n rounds;
only the cost is measured, never the acceptance. Per-part timing synchronises the device at each part (the parts of
a GPU round cannot be timed otherwise), which costs a few microseconds per part.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from ..bench.measure import timed
from ..bench.methods import greedy
from ..bench.runner import environment, prefill

SCHEMA = "longspec-cost/1"
DEFAULT_TREES = {"chain": [1, 1, 1], "beam": [4, 16, 16, 16, 16]}


@dataclass
class CostSettings:
    contexts: list[int]
    trees: dict[str, list[int]] = field(default_factory=lambda: dict(DEFAULT_TREES))
    rounds: int = 16  # rounds (plain: steps) per measurement, beyond the short call
    repeats: int = 3  # calls of each length per figure; the fastest counts
    kernel_queries: list[int] = field(default_factory=lambda: [1, 4, 16, 69])
    kernel_repeats: int = 20
    seed: int = 0


def short_call_tokens(trees: dict[str, list[int]]) -> int:
    """New tokens of the short call: more than the deepest tree, so both calls end with the same shallow rounds."""
    return max((len(shape) for shape in trees.values()), default=0) + 2


def random_prompt(vocab_size: int, length: int, seed: int, device: torch.device) -> torch.LongTensor:
    """`[1, length]` random token ids (the cost of a forward does not depend on which tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (1, length), generator=generator).to(device)


@contextmanager
def drafting_with(drafter, tree_shape: list[int]):
    """The drafter with `tree_shape` and per-part round timing on, restored afterwards."""
    config = drafter.generation_config
    saved = config.tree_shape, getattr(config, "profile_rounds", False)
    config.tree_shape, config.profile_rounds = list(tree_shape), True
    try:
        yield drafter
    finally:
        config.tree_shape, config.profile_rounds = saved


def time_call(target, input_ids: torch.LongTensor, cache, new_tokens: int, drafter=None) -> dict:
    """One greedy generate() of `new_tokens` continuing `cache` (left as it was: cropped back to the prompt).

    Returns seconds, `units` (verification rounds with a drafter, target forwards = new tokens without), the
    loop's per-part seconds when it reports them (else {}), and the drafter's tau."""
    prefix = cache.get_seq_length()
    options = {} if drafter is None else {"assistant_model": drafter}
    with torch.no_grad(), timed(target.device) as clock:
        greedy(target, input_ids, new_tokens, cache=cache, **options)
    grown = cache.get_seq_length() - prefix  # plain decoding appends its tokens to the prompt cache
    if grown > 0:
        cache.crop(-grown)
    if drafter is None:
        return {"seconds": clock["seconds"], "units": new_tokens, "timings": {}, "tau": 1.0}
    stats = drafter.stats
    timings = getattr(stats, "timings", None) or {}
    return {"seconds": clock["seconds"], "units": stats.rounds, "timings": dict(timings), "tau": stats.tau}


def per_unit(short: dict, long: dict) -> dict:
    """Seconds per round (step) and per part, from a short and a long call: their difference cancels what every call
    pays once."""
    units = long["units"] - short["units"]
    # Fall back to the long call alone (an upper bound: it includes what every call pays once) when the difference
    # says nothing: no more rounds (a draft accepting everything), or no more time (noise above a tiny model's rounds).
    if units <= 0 or long["seconds"] <= short["seconds"]:
        short, units = {"seconds": 0.0, "units": 0, "timings": {}}, long["units"]
    seconds = (long["seconds"] - short["seconds"]) / units
    parts = {name: (long["timings"][name] - short["timings"].get(name, 0.0)) / units for name in long["timings"]}
    if parts:
        parts["other"] = seconds - sum(parts.values())  # the rest of the loop: emitting, stopping criteria, Python
    return {"seconds": seconds, "parts": parts or None, "units": units, "tau": long["tau"]}


def measure(target, input_ids, cache, short: int, long: int, repeats: int, drafter=None) -> dict:
    """:func:`per_unit` of the fastest of `repeats` short and long calls (interleaved; timing noise only ever adds
    time), after an untimed warm-up call."""
    time_call(target, input_ids, cache, short, drafter)
    calls = {short: [], long: []}
    for _ in range(max(repeats, 1)):
        for tokens, made in calls.items():
            made.append(time_call(target, input_ids, cache, tokens, drafter))
    fastest = {tokens: min(made, key=lambda call: call["seconds"]) for tokens, made in calls.items()}
    return per_unit(fastest[short], fastest[long])


def attention_shape(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of the target's attention layers."""
    config = config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def mean_seconds(fn, repeats: int, device: torch.device, batches: int = 5) -> float:
    """Seconds per call of `fn`: the fastest of `batches` means over `repeats` calls (no device sync between calls
    of a batch; the fastest batch is the one the OS or other processes interrupted least)."""
    fn()  # kernel selection and allocations happen in the first call
    means = []
    for _ in range(batches):
        with timed(device) as clock:
            for _ in range(repeats):
                fn()
        means.append(clock["seconds"] / repeats)
    return min(means)


@torch.no_grad()
def kernel_rows(target, context: int, queries: list[int], repeats: int, seed: int = 0) -> list[dict]:
    """Per-layer ms of prefix attention with LSE over `context` keys, per backend and query count, and of the q = 1
    SDPA attention a plain decode step runs (the reference), on random tensors of the target's shape and dtype."""
    from ..attention import available_backends, prefix_attention_lse

    if not queries:
        return []
    heads, kv_heads, head_dim = attention_shape(target.config)
    device, dtype = target.device, target.dtype
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    key, value = randn(1, kv_heads, context, head_dim), randn(1, kv_heads, context, head_dim)  # [1, Hkv, L, D]
    scale = head_dim**-0.5
    decode_query = randn(1, heads, 1, head_dim)  # [1, H, 1, D]

    def decode():
        torch.nn.functional.scaled_dot_product_attention(decode_query, key, value, scale=scale, enable_gqa=True)

    rows = [{"context": context, "kernel": "sdpa_decode", "queries": 1,
             "ms": 1000 * mean_seconds(decode, repeats, device)}]
    for backend in available_backends(device):
        for q in queries:
            query = randn(1, heads, q, head_dim)  # [1, H, q, D]
            call = functools.partial(prefix_attention_lse, query, key, value, None, scale, backend)
            seconds = mean_seconds(call, repeats, device)
            rows.append({"context": context, "kernel": backend, "queries": q, "ms": 1000 * seconds})
    return rows


def round_row(context: int, drafter: str, tree: str, shape: list[int], measured: dict, step_seconds: float) -> dict:
    parts = measured["parts"]
    return {
        "context": context, "drafter": drafter, "tree": tree, "tree_shape": list(shape), "nodes": 1 + sum(shape),
        "round_ms": 1000 * measured["seconds"], "break_even_tau": measured["seconds"] / step_seconds,
        "parts_ms": None if parts is None else {k: 1000 * v for k, v in parts.items()},
        "rounds": measured["units"], "tau": measured["tau"],
    }


def run_cost(target, drafters: dict, settings: CostSettings, progress: bool = True) -> dict:
    """Time plain steps, speculative rounds per drafter (name -> drafter) and tree, and prefix-attention kernels at
    each context length; returns the JSON-ready result (see `SCHEMA`)."""
    from tqdm.auto import tqdm

    target.eval()
    short = short_call_tokens(settings.trees)
    long = short + settings.rounds
    vocab = target.config.get_text_config(decoder=True).vocab_size
    plain, rounds, kernels = [], [], []
    steps = len(settings.contexts) * (2 + len(drafters) * len(settings.trees))
    with tqdm(total=steps, desc="cost", disable=not progress) as bar:
        for context in settings.contexts:
            input_ids = random_prompt(vocab, context, settings.seed, target.device)
            cache, prefill_seconds = prefill(target, input_ids)
            bar.set_postfix_str(f"{context} plain")
            step = measure(target, input_ids, cache, short, long, settings.repeats)
            plain.append({"context": context, "step_ms": 1000 * step["seconds"], "prefill_ms": 1000 * prefill_seconds})
            bar.update(1)
            for name, drafter in drafters.items():
                for tree, shape in settings.trees.items():
                    bar.set_postfix_str(f"{context} {name} {tree}")
                    with drafting_with(drafter, shape):
                        measured = measure(target, input_ids, cache, short, long, settings.repeats, drafter)
                    rounds.append(round_row(context, name, tree, shape, measured, step["seconds"]))
                    bar.update(1)
            del cache  # before the kernels allocate their own keys and values
            bar.set_postfix_str(f"{context} kernels")
            kernels += kernel_rows(target, context, settings.kernel_queries, settings.kernel_repeats, settings.seed)
            bar.update(1)
    heads, kv_heads, head_dim = attention_shape(target.config)
    text_config = target.config.get_text_config(decoder=True)
    return {
        "schema": SCHEMA,
        "environment": {**environment(target), "layers": text_config.num_hidden_layers, "heads": heads,
                        "kv_heads": kv_heads, "head_dim": head_dim,
                        "drafters": {name: type(d).__name__ for name, d in drafters.items()},
                        "tree_attn_backend": next((getattr(d.generation_config, "tree_attn_backend", "auto")
                                                   for d in drafters.values()), "auto")},
        "settings": {**asdict(settings), "short_call_tokens": short, "long_call_tokens": long},
        "plain": plain,
        "rounds": rounds,
        "kernels": kernels,
    }
