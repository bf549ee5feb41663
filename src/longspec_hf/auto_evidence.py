"""Evidence for the constants of ``tree_shape="auto"``: what its models predicted in real calls, replayed offline.

The policy's models are estimators, and each of their constants sets a trade-off (a prior's weight, a bin grid, a
memory length, a kernel width). Timing a whole bench per value cannot separate them: single runs of the same policy
vary by more than the differences between values. What can be measured exactly is each estimator's error on the
events it predicts, which do not depend on the timing noise. :func:`recording` captures, per round of real
``generate()`` calls under ``"auto"``:

* the acceptance observations (every candidate child of every accepted drafted node: its draft probability, its
  sibling rank, its depth, whether it was the target's token) that the acceptance model learns from;
* per kept draft node, the calibrated `h` along its path (what the call's scale multiplies), and the round's
  accepted draft tokens;
* the prompt-lookup branch's accepted tokens beyond the draft's, in rounds that verified it;

and, at the end, the cost models' timing samples. The replays then score each estimator with other constants on the
same events, predicting each event only from those before it (prequential): the acceptance model by log-loss, the
call's scale and the lookup branch's running mean by the error of their prediction of a round, the cost curves by
the error of their prediction of the next timed forward.

The policy's own constants (how far it looks ahead, which widths it weighs, how often it explores) decide trees, so
they are measured on whole calls instead: :func:`modelled_run` runs real ``generate()`` calls on a *frozen* cost
model (the device as recorded: it learns nothing and also gives the policy its draft forwards' seconds), so two runs
differ only where their constants make them decide differently, and prices each round on that model.

``longspec eval ... --auto-evidence FILE`` records while it measures tau and prints the replay; ``python -m
longspec_hf.auto_evidence FILE`` replays a recorded file again; ``python -m longspec_hf.auto_evidence policy --target
T --draft D --device-samples FILE`` compares the policy's constants on that file's device.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import time

from . import acceptance, auto_tree, cost_model
from .acceptance import AcceptanceModel
from .cost_model import CostModel

COARSE_EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001)
FINE_EDGES = (0.0, 0.005, 0.01, 0.02, 0.03, 0.045, 0.06, 0.08, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.35, 0.4,
              0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 1.0001)


class Evidence:
    """Recorded rounds, one list per ``generate()`` call, and the cost models' samples (filled on exit)."""

    def __init__(self):
        self.calls: list[list[dict]] = []
        self.cost_samples: list[dict] = []

    def new_call(self) -> list[dict]:
        self.calls.append([])
        return self.calls[-1]

    def to_json(self) -> dict:
        return {"calls": self.calls, "cost_samples": self.cost_samples}

    @classmethod
    def from_json(cls, data: dict) -> Evidence:
        evidence = cls()
        evidence.calls, evidence.cost_samples = data["calls"], data["cost_samples"]
        return evidence


@contextlib.contextmanager
def recording():
    """Record the evidence of every ``tree_shape="auto"`` call made inside the block (this thread or task)."""
    evidence = Evidence()
    token = auto_tree.EVIDENCE.set(evidence)
    try:
        yield evidence
    finally:
        auto_tree.EVIDENCE.reset(token)
        evidence.cost_samples = [model.samples for model in cost_model._MODELS.values() if model.samples]


# ---------------------------------------------------------------------------------------------------------------------
# the acceptance model: log-loss of each observation, predicted before the round that made it was observed

def log_loss(p: float, hit: bool) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return -math.log(p if hit else 1 - p)


def acceptance_loss(evidence: Evidence, keep: float | None = None,
                    **settings) -> tuple[float, float, int, AcceptanceModel]:
    """(mean log-loss of ``h(q, rank)``, of ``rank_rate(rank, depth)``, observations, the model at the end) over the
    recorded calls, with one :class:`AcceptanceModel` built from `settings` carried across calls as ``generate()``
    carries a drafter's (keeping `keep` of it per new call; default: what ``generate()`` keeps)."""
    keep = acceptance.CALL_MEMORY if keep is None else keep
    model = AcceptanceModel(**settings)
    h_loss = rank_loss = 0.0
    count = 0
    for index, call in enumerate(evidence.calls):
        if index:
            model.forget(keep)
        for round in call:
            for probabilities, hits, depth in round["observations"]:  # predicted first: the round's own choices
                for rank, (q, hit) in enumerate(zip(probabilities, hits, strict=True)):
                    h_loss += log_loss(model.h(q, rank), hit)
                    rank_loss += log_loss(model.rank_rate(rank, depth), hit)
                    count += 1
            for probabilities, hits, depth in round["observations"]:
                model.observe(probabilities, hits, depth)
    return h_loss / max(count, 1), rank_loss / max(count, 1), count, model


ACCEPTANCE_VARIANTS = {
    "as shipped": {},
    "prior weight 1": {"prior_weight": 1.0},
    "prior weight 10": {"prior_weight": 10.0},
    "10 even bins": {"edges": COARSE_EDGES},
    "32 bins": {"edges": FINE_EDGES},
    "one h table for all ranks": {"rank_classes": 1},
    "three h tables (ranks 0, 1, 2+)": {"rank_classes": 3},
    "rank rates for one depth": {"depths": 1},
    "rank rates for 6 depths": {"depths": 6},
    "rank prior 0.3/0.05/0.02/0.01": {"rank_prior": (0.3, 0.05, 0.02, 0.01)},
    "rank prior flat 0.1": {"rank_prior": (0.1,)},
    "calls forget all (keep 0)": {"keep": 0.0},
    "calls forget nothing (keep 1)": {"keep": 1.0},
}


# ---------------------------------------------------------------------------------------------------------------------
# the call's scale: predicted against accepted draft tokens per round

def scaled_rounds(call: list[dict], rate: float | None = auto_tree.SCALE_RATE,
                  bounds: tuple[float, float] = auto_tree.SCALE_RANGE):
    """`(predicted, accepted, rows)` draft tokens of each drafted round of a call, the prediction scaled as
    :class:`~longspec_hf.auto_tree.AutoTree` scales it with `rate` (0: no scale) and `bounds`; `rate=None`: by the
    ratio of the call's accepted to predicted tokens so far, unbounded."""
    scale, accepted_sum, predicted_sum = 1.0, 0.0, 0.0
    for round in call:
        if not round["paths"]:
            continue
        predicted = sum(math.prod(min(scale * h, 1.0) for h in path) for path in round["paths"])
        yield predicted, round["accepted"], round["rows"]
        if rate is None:
            accepted_sum += round["accepted"]
            predicted_sum += sum(math.prod(min(h, 1.0) for h in path) for path in round["paths"])
            scale = (accepted_sum + 1) / (predicted_sum + 1)
        else:
            factor = ((round["accepted"] + 1) / (predicted + 1)) ** rate
            scale = min(max(scale * factor, bounds[0]), bounds[1])


def scale_error(evidence: Evidence, **settings) -> tuple[float, float, int]:
    """(root mean square error, mean error) of the rounds' predicted accepted draft tokens per row, and the rounds
    scored, under :func:`scaled_rounds` with `settings`."""
    errors = [(predicted - accepted) / rows for call in evidence.calls
              for predicted, accepted, rows in scaled_rounds(call, **settings)]
    if not errors:
        return math.nan, math.nan, 0
    return math.sqrt(sum(e * e for e in errors) / len(errors)), sum(errors) / len(errors), len(errors)


SCALE_VARIANTS = {
    "no scale": {"rate": 0.0},
    "rate 0.1": {"rate": 0.1},
    "rate 0.2 (as shipped)": {},
    "rate 0.5": {"rate": 0.5},
    "rate 1": {"rate": 1.0},
    "rate 0.2, range 0.25-4": {"bounds": (0.25, 4.0)},
    "ratio of the call's sums": {"rate": None},
}


# ---------------------------------------------------------------------------------------------------------------------
# the lookup branch's running mean

def lookup_error(evidence: Evidence, prior: float = auto_tree.LOOKUP_PRIOR,
                 memory: int = 10**9) -> tuple[float, int]:
    """(root mean square error, rounds) of the running mean's prediction of the branch's tokens beyond the draft's
    in each round that verified it, a mean over the last `memory` rounds (default: the call's, as shipped)."""
    squared, count = 0.0, 0
    for call in evidence.calls:
        gain, weight = prior, 1.0
        for round in call:
            beyond = round["lookup_beyond"]
            if beyond is None:
                continue
            squared, count = squared + (gain - beyond) ** 2, count + 1
            gain += (beyond - gain) / (weight + 1)
            weight = min(weight + 1, memory)
    return math.sqrt(squared / max(count, 1)), count


LOOKUP_VARIANTS = {
    "memory 1 (last round)": {"memory": 1},
    "memory 4": {"memory": 4},
    "memory 16": {"memory": 16},
    "memory 64": {"memory": 64},
    "whole call (as shipped)": {},
    "prior 0": {"prior": 0.0},
    "prior 3": {"prior": 3.0},
}


# ---------------------------------------------------------------------------------------------------------------------
# the cost curves: each round's timed verification predicted from the samples before it

def cost_error(evidence: Evidence, bandwidth: float = cost_model.BANDWIDTH, kind: str = "verify",
               stride: int = 3) -> tuple[float, int, float]:
    """(median |log(predicted / measured)|, samples scored, milliseconds per curve fit) of every `stride`-th round
    sample of `kind`, predicted by the curve of the samples before it (measurements and rounds) with `bandwidth`."""
    errors, fit_seconds, fits = [], 0.0, 0
    for samples in evidence.cost_samples:
        for name, rows in samples.items():
            if not name.startswith(kind + "/"):
                continue
            for i in range(1, len(rows), stride):
                context, size, seconds, anchor = rows[i]
                if anchor or seconds <= 0:
                    continue
                model = CostModel()
                model.bandwidth, model.samples = bandwidth, {name: rows[:i]}
                start = time.perf_counter()
                curve = model.curve(kind, int(name.split("/")[1]), int(context))
                fit_seconds, fits = fit_seconds + time.perf_counter() - start, fits + 1
                predicted = curve(size)
                if predicted > 0:
                    errors.append(abs(math.log(predicted / seconds)))
    return (statistics.median(errors) if errors else math.nan), len(errors), 1000 * fit_seconds / max(fits, 1)


BANDWIDTHS = (0.05, 0.1, 0.15, 0.3, 0.6)


# ---------------------------------------------------------------------------------------------------------------------

def replay(evidence: Evidence) -> str:
    """The replay's tables (markdown)."""
    rounds = sum(len(call) for call in evidence.calls)
    lines = [f"{len(evidence.calls)} calls, {rounds} rounds.", "",
             "| acceptance model | log-loss of h | log-loss of rank rates | observations |", "|---|---|---|---|"]
    for label, settings in ACCEPTANCE_VARIANTS.items():
        h_loss, rank_loss, count, _ = acceptance_loss(evidence, **settings)
        lines.append(f"| {label} | {h_loss:.4f} | {rank_loss:.4f} | {count} |")
    lines += ["", "| scale of the predictions | RMSE (tokens per row and round) | mean error | rounds |",
              "|---|---|---|---|"]
    for label, settings in SCALE_VARIANTS.items():
        rmse, bias, count = scale_error(evidence, **settings)
        lines.append(f"| {label} | {rmse:.3f} | {bias:+.3f} | {count} |")
    lines += ["", "| lookup branch's running mean | RMSE (tokens per row and round) | rounds |", "|---|---|---|"]
    for label, settings in LOOKUP_VARIANTS.items():
        rmse, count = lookup_error(evidence, **settings)
        lines.append(f"| {label} | {rmse:.3f} | {count} |")
    lines += ["", "| cost curves' bandwidth (log context) | median abs log error of the next verification | "
              "samples | ms per fit |", "|---|---|---|---|"]
    for bandwidth in BANDWIDTHS:
        error, count, fit_ms = cost_error(evidence, bandwidth)
        shipped = " (as shipped)" if bandwidth == cost_model.BANDWIDTH else ""
        lines.append(f"| {bandwidth}{shipped} | {error:.3f} | {count} | {fit_ms:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# the policy's own constants: real calls on a frozen device, so that only the constants differ between runs

@contextlib.contextmanager
def policy_constants(**values):
    """Set constants of :mod:`~longspec_hf.auto_tree` or :mod:`~longspec_hf.acceptance` (e.g. ``HORIZON=2``,
    ``RANK_CLASSES=1``) inside the block."""
    homes = {}
    for name in values:
        home = next((m for m in (auto_tree, acceptance) if hasattr(m, name) and name.isupper()), None)
        if home is None:
            raise ValueError(f"auto_tree and acceptance have no constant {name}")
        homes[name] = home
    saved = {name: getattr(homes[name], name) for name in values}
    for name, value in values.items():
        setattr(homes[name], name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(homes[name], name, value)


@contextlib.contextmanager
def frozen_device(target, drafter, samples: dict):
    """Calls of `drafter` with `target` inside the block use a frozen cost model of `samples` (a cost model's
    ``samples``): it learns nothing and its curves are the device, draft forwards included, so the policy's
    decisions depend on the text and the constants only."""
    model = CostModel()
    model.samples, model.frozen = samples, True
    name = cost_model.registry_name(target, drafter)
    saved = cost_model._MODELS.get(name)
    cost_model._MODELS[name] = model
    try:
        yield model
    finally:
        if saved is None:
            cost_model._MODELS.pop(name, None)
        else:
            cost_model._MODELS[name] = saved


def modelled_seconds(round: dict, model: CostModel) -> float:
    """A recorded round's seconds on the device `model` describes: its draft forwards, verification and rest."""
    rows, context = round["rows"], round["context"]
    draft = model.curve("draft", rows, context)
    return sum(draft(w) for w in round["drafted"]) + model.curve("verify", rows, context)(round["nodes"]) + \
        model.curve("rest", rows, context)(round["nodes"])


def prompt_caches(target, prompts: list) -> list:
    """Each prompt's cache of all its tokens but the last: runs of several variants on the same prompts pay each
    prompt's prefill once."""
    import torch
    from transformers import DynamicCache

    from .compat import cache_kwarg

    caches = []
    with torch.no_grad():
        for ids in prompts:
            cache = DynamicCache()
            target(ids[:, :-1], use_cache=True, **{cache_kwarg(target): cache})
            caches.append(cache)
    return caches


def modelled_run(target, drafter, prompts: list, samples: dict, max_new_tokens: int, caches: list | None = None,
                 **constants) -> dict:
    """Greedy calls of `drafter` on `prompts` under ``tree_shape="auto"`` with `constants` of
    :mod:`~longspec_hf.auto_tree` on the frozen device of `samples`: the rounds' tokens (the prefill makes the
    first), modelled seconds and tau. The drafter's acceptance model starts afresh, so every run meets the same
    evidence in the same order. `caches`: :func:`prompt_caches` of the prompts (copied, not consumed)."""
    import copy

    import torch

    drafter._auto_acceptance = None
    with policy_constants(**constants), frozen_device(target, drafter, samples) as model, recording() as evidence, \
            host_timer() as host:
        for i, ids in enumerate(prompts):
            cache = {} if caches is None else {"cache": copy.deepcopy(caches[i])}
            target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=drafter, do_sample=False,
                            max_new_tokens=max_new_tokens, **cache)
    drafter._auto_acceptance = None
    rounds = [r for call in evidence.calls for r in call]
    tokens = sum(r["emitted"] for r in rounds)
    seconds = sum(modelled_seconds(r, model) for r in rounds)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / max(seconds, 1e-12),
            "tau": tokens / max(sum(r["rows"] for r in rounds), 1), "rounds": len(rounds),
            "policy_ms_per_round": 1000 * host[0] / max(len(rounds), 1)}


@contextlib.contextmanager
def host_timer():
    """Seconds spent in the policy's own host arithmetic (``[seconds]``, filled as the block runs): its decisions
    (`expand`, `lookahead` and `choose` after the level's transfer) and its bookkeeping (`begin_round`,
    `end_round`). What its constants cost beside the forwards."""
    spent = [0.0]
    originals = {name: getattr(auto_tree.AutoTree, name) for name in ("begin_round", "expand", "end_round")}

    def timed(function):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return run

    choose = auto_tree.AutoTree.choose

    def timed_choose(self, depth, parent_local, child_logprobs, level_logprobs, vocab=None):
        # the level's one transfer (the draft forward's wait) is not the policy's: the choice after it is
        level_logprobs.sum().item()
        start = time.perf_counter()
        try:
            return choose(self, depth, parent_local, child_logprobs, level_logprobs, vocab)
        finally:
            spent[0] += time.perf_counter() - start

    for name, function in originals.items():
        setattr(auto_tree.AutoTree, name, timed(function))
    auto_tree.AutoTree.choose = timed_choose
    try:
        yield spent
    finally:
        for name, function in originals.items():
            setattr(auto_tree.AutoTree, name, function)
        auto_tree.AutoTree.choose = choose


# Each constant of auto_tree / acceptance with the values tried against the shipped one.
POLICY_VALUES = {
    "HORIZON": (1, 2, 8), "FRONTIER": (1, 2, 16), "WIDTHS": ((1, 2, 4, 8, 16), tuple(range(1, 17))),
    "EXPLORE_EVERY": (2, 8), "EXPLORE_MAX": (16, 256), "LOOKUP_PRIOR": (0.0, 3.0), "SCALE_RATE": (0.0, 0.5),
    "DEPTHS": (1,), "RANK_CLASSES": (1,), "PRIOR_WEIGHT": (10.0,),
}
POLICY_VARIANTS = {"as shipped": {}} | {f"{name} {value}": {name: value} for name, values in POLICY_VALUES.items()
                                        for value in values}


def policy_table(target, drafter, prompts: list, samples: dict, max_new_tokens: int,
                 variants: dict | None = None) -> str:
    """Modelled tokens per second of each variant of the policy's constants, relative to the shipped ones."""
    variants = POLICY_VARIANTS if variants is None else variants
    caches = prompt_caches(target, prompts)
    base = modelled_run(target, drafter, prompts, samples, max_new_tokens, caches)
    lines = ["| constants | modelled tokens/s vs shipped | tau | rounds | policy host ms per round |",
             "|---|---|---|---|---|"]
    for label, constants in variants.items():
        run = base if not constants else modelled_run(target, drafter, prompts, samples, max_new_tokens, caches,
                                                      **constants)
        lines.append(f"| {label} | {run['tokens_per_second'] / base['tokens_per_second']:.3f} | {run['tau']:.2f} | "
                     f"{run['rounds']} | {run['policy_ms_per_round']:.2f} |")
    return "\n".join(lines)


def save(evidence: Evidence, path: str) -> None:
    with open(path, "w") as f:
        json.dump(evidence.to_json(), f)


def load(path: str) -> Evidence:
    with open(path) as f:
        return Evidence.from_json(json.load(f))


def policy_cli(argv: list[str]) -> None:
    import argparse

    from .evaluation import prompt_windows
    from .loading import load_causal_lm, load_draft
    from .training.data import load_texts

    parser = argparse.ArgumentParser(prog="python -m longspec_hf.auto_evidence policy")
    parser.add_argument("--target", required=True)
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--device-samples", required=True, metavar="EVIDENCE.json",
                        help="the device: the cost samples recorded in this evidence file (its first cost model)")
    parser.add_argument("--domain", action="append", default=None, metavar="NAME=SOURCE")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--variant", action="append", default=None, metavar="LABEL=NAME:VALUE;...",
                        help="a variant of the constants (repeatable; default: the built-in list), e.g. "
                             "'horizon 8=HORIZON:8' or 'both=FRONTIER:2;WIDTHS:(1, 2, 4)'; values are Python literals")
    args = parser.parse_args(argv)
    target, tokenizer = load_causal_lm(args.target, args.gguf_file)
    draft = load_draft(args.draft, target)
    draft.generation_config.tree_shape = "auto"
    samples = load(args.device_samples).cost_samples[0]
    domains = dict(d.split("=", 1) for d in args.domain) if args.domain else {"code": "installed-code",
                                                                              "prose": "installed-prose"}
    prompts = [ids for source in domains.values() for context in args.contexts
               for ids in prompt_windows(tokenizer, load_texts([source]), context, args.prompts)]
    variants = None
    if args.variant:
        import ast

        variants = {"as shipped": {}}
        for text in args.variant:
            label, spec = text.split("=", 1)
            variants[label] = {name: ast.literal_eval(value) for name, value in
                               (item.split(":", 1) for item in spec.split(";") if item)}
    print(policy_table(target, draft, prompts, samples, args.max_new_tokens, variants))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["policy"]:
        return policy_cli(argv[1:])
    if len(argv) != 1:
        sys.exit("usage: python -m longspec_hf.auto_evidence EVIDENCE.json  (written by longspec eval --auto-evidence)"
                 "\n       python -m longspec_hf.auto_evidence policy --target T --draft D --device-samples "
                 "EVIDENCE.json ...")
    print(replay(load(argv[0])))


if __name__ == "__main__":
    main()
