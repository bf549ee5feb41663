"""Seeded random cases for the losslessness fuzz: a case is drawn from its index alone, so any failure reproduces from
that number (`python tests/fuzz_cases.py INDEX`, with `--minimise` to shrink it).

A case is compared with plain `generate()` on the same inputs: fp32 greedy (and seeded sampling of one row) must be
token-identical, except right after a rounding tie of plain decoding (its top two processed scores under `TIE_GAP`
apart: either token is plain decoding's up to the order of fp32 sums; such cases are counted and listed); bf16 is not
expected to be exact (the tree forward sums in another order than a decode step), so it must run and its agreement
(the share of new tokens before the first difference) is reported. A case plain `generate()` refuses (raises) must
raise the same error with the draft.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from conftest import FUZZ_FAMILIES, VOCAB, OracleDrafter, random_prompt, tiny_target
from test_batch import left_padded
from transformers import DynamicCache

from longspec_hf import LongSpecDraftModel, SelfDraft
from longspec_hf.compat import cache_kwarg

PAD = 0
FAMILY_NAMES = tuple(sorted(FUZZ_FAMILIES))
DRAFTERS = ("random", "oracle", "self")
PROCESSORS = ("none", "repetition_penalty", "no_repeat_ngram", "min_new_tokens", "suppress_tokens", "bad_words",
              "prefix_allowed", "combo")
EOS_MODES = ("none", "one", "two")


@dataclass(frozen=True)
class Case:
    index: int
    family: str
    dtype: str  # "fp32" (exact) or "bf16" (agreement)
    drafter: str
    tree_shape: tuple[int, ...]
    sink: int
    window: int
    corrupt_every: int  # oracle drafts: every n-th position is wrong (0: never)
    prompt_lens: tuple[int, ...]  # one per row; unequal lengths are left-padded
    extra_pad: int  # padding columns left of every row (a single row may be padded, e.g. to a fixed length)
    explicit_mask: bool  # pass an all-ones attention_mask even when nothing is padded
    cached: int  # tokens of the prompts already in a DynamicCache passed to generate (0: none)
    old_cache_name: bool  # pass that cache as `past_key_values` (deprecated since transformers 5.24) or as `cache`
    max_new_tokens: int
    use_max_length: bool  # ask for the same length through max_length instead
    eos: str
    eos_offset: int  # EOS is the token plain decoding emits at this offset of row `eos_row`
    eos_row: int
    processor: str
    processor_arg: int  # penalty x10, n-gram size, min new tokens or suppressed-token seed, by processor
    sampling: bool  # seeded sampling of a single row, which reproduces plain sampling token for token
    seed: int

    @property
    def padded(self) -> bool:
        return self.extra_pad > 0 or len(set(self.prompt_lens)) > 1

    @property
    def width(self) -> int:
        """Columns of the padded prompt batch: where the new tokens start in every row."""
        return max(self.prompt_lens) + self.extra_pad


# ---------------------------------------------------------------------------------------------------------------------
# drawing


def draw_tree(rng: random.Random) -> tuple[int, ...]:
    kind = rng.choices(("chain", "beam", "narrow", "irregular"), weights=(30, 20, 30, 20))[0]
    depth = rng.randint(1, 6)
    if kind == "chain":
        return (1,) * depth
    if kind == "beam":
        # The official beam tree is [4, 16, 16, 16, 16]; draw that family of shapes, sometimes exactly it.
        if rng.random() < 0.25:
            return (4, 16, 16, 16, 16)
        return (rng.randint(2, 4),) + tuple(rng.randint(4, 16) for _ in range(rng.randint(0, 4)))
    if kind == "narrow":
        return tuple(rng.randint(1, 3) for _ in range(depth))
    return tuple(rng.randint(1, 8) for _ in range(depth))


def draw_prompt_len(rng: random.Random) -> int:
    # Short prompts hit the sink/window edges, long ones exceed every draft window and Mistral's sliding window (48).
    bucket = rng.choices(("tiny", "short", "medium", "long"), weights=(15, 35, 35, 15))[0]
    low, high = {"tiny": (1, 4), "short": (5, 40), "medium": (41, 120), "long": (121, 320)}[bucket]
    return rng.randint(low, high)


def draw_prompt_lens(rng: random.Random, batch: int) -> tuple[int, ...]:
    if batch > 1 and rng.random() < 0.25:
        return (draw_prompt_len(rng),) * batch  # a batch without padding
    lens = [draw_prompt_len(rng) for _ in range(batch)]
    if batch > 1 and len(set(lens)) == 1:
        lens[0] += 1  # keep "padded" batches really padded
    return tuple(lens)


def draw_processor_arg(rng: random.Random, processor: str, max_new_tokens: int) -> int:
    if processor in ("repetition_penalty", "combo"):
        return rng.choice((5, 8, 12, 15, 20))  # tenths: penalties below 1 favour repeats, above 1 avoid them
    if processor == "no_repeat_ngram":
        return rng.randint(1, 3)
    if processor == "min_new_tokens":
        return rng.randint(1, max_new_tokens)
    return rng.randrange(2**16)


def draw_case(index: int) -> Case:
    rng = random.Random(f"longspec-fuzz-{index}")  # a string seed is hashed the same way in every process
    family = rng.choice(FAMILY_NAMES)
    batch = rng.choices((1, 2, 3, 4), weights=(50, 20, 15, 15))[0]
    prompt_lens = draw_prompt_lens(rng, batch)
    extra_pad = rng.randint(1, 5) if rng.random() < 0.1 else 0
    padded = extra_pad > 0 or len(set(prompt_lens)) > 1
    cached = 0
    if not padded and prompt_lens[0] > 1 and rng.random() < 0.35:
        cached = rng.randint(1, prompt_lens[0] - 1)
    max_new_tokens = rng.randint(1, 7) if rng.random() < 0.2 else rng.randint(8, 32)
    processor = rng.choices(PROCESSORS, weights=(34, 10, 10, 10, 8, 8, 10, 10))[0]
    eos = rng.choices(EOS_MODES, weights=(40, 45, 15))[0]
    return Case(
        index=index,
        family=family,
        dtype=rng.choices(("fp32", "bf16"), weights=(80, 20))[0],
        drafter=rng.choices(DRAFTERS, weights=(40, 40, 20))[0],
        tree_shape=draw_tree(rng),
        sink=rng.randint(0, 8),
        window=rng.randint(1, 64),
        corrupt_every=rng.randint(0, 7),
        prompt_lens=prompt_lens,
        extra_pad=extra_pad,
        explicit_mask=not padded and rng.random() < 0.3,
        cached=cached,
        old_cache_name=rng.random() < 0.5,
        max_new_tokens=max_new_tokens,
        use_max_length=rng.random() < 0.15,
        eos=eos,
        eos_offset=rng.randrange(max_new_tokens),
        eos_row=rng.randrange(batch),
        processor=processor,
        processor_arg=draw_processor_arg(rng, processor, max_new_tokens),
        sampling=batch == 1 and rng.random() < 0.1,
        seed=rng.randrange(2**16),
    )


# ---------------------------------------------------------------------------------------------------------------------
# building a case's inputs


@functools.cache
def target_for(family: str, dtype: str):
    fp32 = tiny_target(family)
    if dtype == "fp32":
        return fp32
    return copy.deepcopy(fp32).to(torch.bfloat16)  # a copy: the cached fp32 target serves other cases


def prompts_of(case: Case) -> list[torch.LongTensor]:
    return [random_prompt(n, seed=case.seed * 4 + row) for row, n in enumerate(case.prompt_lens)]


def input_kwargs(case: Case) -> dict:
    ids, mask = left_padded(prompts_of(case), case.extra_pad)
    kwargs = {"inputs": ids}
    if case.padded or case.explicit_mask:
        kwargs["attention_mask"] = mask
    return kwargs


def processor_kwargs(case: Case) -> dict:
    arg = case.processor_arg
    if case.processor == "repetition_penalty":
        return {"repetition_penalty": arg / 10}
    if case.processor == "no_repeat_ngram":
        return {"no_repeat_ngram_size": arg}
    if case.processor == "min_new_tokens":
        return {"min_new_tokens": arg}
    if case.processor == "suppress_tokens":
        return {"suppress_tokens": random.Random(arg).sample(range(VOCAB), 12)}
    if case.processor == "bad_words":
        # Single tokens and pairs: a pair bans its second token only right after its first, so it reads history.
        rng = random.Random(arg)
        return {"bad_words_ids": [[rng.randrange(2, VOCAB)] for _ in range(4)]
                + [[rng.randrange(2, VOCAB), rng.randrange(2, VOCAB)] for _ in range(8)]}
    if case.processor == "prefix_allowed":
        return {"prefix_allowed_tokens_fn": functools.partial(allowed_tokens, arg % 5 + 2)}
    if case.processor == "combo":
        return {"repetition_penalty": arg / 10, "no_repeat_ngram_size": 2, "suppress_tokens": [2, 3, 5, 7]}
    return {}


def allowed_tokens(modulus: int, batch_id: int, ids: torch.LongTensor) -> list[int]:
    """A constraint that differs by row (`batch_id`) and by step, as a real prefix_allowed_tokens_fn may."""
    return [t for t in range(VOCAB) if (t + batch_id + ids.shape[-1]) % modulus != 0]


def decoding_kwargs(case: Case) -> dict:
    if case.use_max_length:
        length = {"max_length": case.width + case.max_new_tokens}
    else:
        length = {"max_new_tokens": case.max_new_tokens}
    if case.sampling:
        rng = random.Random(case.seed)
        sampling = {"do_sample": True, "temperature": rng.choice((0.5, 0.8, 1.0, 1.3)),
                    "top_k": rng.choice((None, 5, 20)), "top_p": rng.choice((None, 0.8, 0.95))}
    else:
        sampling = {"do_sample": False}
    return {**length, **sampling, **processor_kwargs(case)}


def pick_eos(case: Case, free: torch.LongTensor) -> int | list[int] | None:
    """An EOS id that plain decoding emits at `eos_offset` of one row, so it falls inside the draft's accepted runs."""
    if case.eos == "none":
        return None
    row = free[case.eos_row, case.width:]
    token = int(row[min(case.eos_offset, row.numel() - 1)])
    if case.eos == "one":
        return token
    return [random.Random(case.seed).randrange(2, VOCAB), token]


def cache_kwargs(case: Case, target, ids: torch.LongTensor) -> dict:
    """A prompt cache holding the first `case.cached` tokens, built fresh: generate() continues it in place."""
    if not case.cached:
        return {}
    cache = DynamicCache()
    with torch.no_grad():
        target(ids[:, : case.cached], use_cache=True, **{cache_kwarg(target): cache})
    return {"past_key_values" if case.old_cache_name else cache_kwarg(target): cache}


def references(expected: torch.LongTensor, case: Case) -> list[torch.LongTensor]:
    """Each row of plain decoding's output without its left padding: the oracle's per-row position space."""
    return [expected[row, case.width - n:] for row, n in enumerate(case.prompt_lens)]


def make_drafter(case: Case, target, expected: torch.LongTensor):
    if case.drafter == "oracle":
        return OracleDrafter(target, references(expected, case), case.tree_shape,
                             corrupt_every=case.corrupt_every, seed=case.seed)
    if case.drafter == "self":
        return SelfDraft.from_target(target, sink_size=case.sink, window_size=case.window, tree_shape=case.tree_shape)
    torch.manual_seed(case.seed)
    draft = LongSpecDraftModel.from_target(target, sink_size=case.sink, window_size=case.window)
    draft.generation_config.tree_shape = list(case.tree_shape)
    return draft


# ---------------------------------------------------------------------------------------------------------------------
# running and judging


@dataclass
class Outcome:
    case: Case
    expected: torch.LongTensor | None  # None: plain generate() refused the case, and so did the draft
    out: torch.LongTensor | None
    agreement: float
    tau: float
    tie_gap: float | None = None  # set when greedy outputs differ right after a rounding tie of plain decoding


def seeded_generate(target, case: Case, **kwargs) -> torch.LongTensor:
    torch.manual_seed(case.seed)  # the same draws for plain and speculative sampling (no-op for greedy)
    return target.generate(**kwargs)


def with_eos(case: Case, target, inputs: dict, decoding: dict) -> dict:
    """`decoding` with the case's EOS ids, picked from plain decoding's own output without them."""
    if case.eos == "none":
        return decoding
    return {**decoding, "eos_token_id": pick_eos(case, seeded_generate(target, case, **inputs, **decoding))}


def run_case(case: Case) -> Outcome:
    target = target_for(case.family, case.dtype)
    inputs = input_kwargs(case)
    decoding = decoding_kwargs(case)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # Random drafts are untrained on purpose; the warning saying so is expected in every such case.
        warnings.filterwarnings("ignore", message=".*untrained.*")
        warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated", category=FutureWarning)
        try:
            decoding = with_eos(case, target, inputs, decoding)
            expected = seeded_generate(target, case, **inputs, **decoding)
        except Exception as error:  # e.g. sampling once every token is banned: the draft must not hide that
            return refused_alike(case, target, inputs, decoding, error)
        drafter = make_drafter(case, target, expected)
        cache = cache_kwargs(case, target, inputs["inputs"])
        out = seeded_generate(target, case, **inputs, **decoding, **cache, assistant_model=drafter)
    return Outcome(case, expected, out, agreement(expected, out, case.width), drafter.stats.tau)


def refused_alike(case: Case, target, inputs: dict, decoding: dict, error: Exception) -> Outcome:
    drafter = make_drafter(case, target, inputs["inputs"])  # an oracle without a continuation drafts at random
    try:
        seeded_generate(target, case, **inputs, **decoding, **cache_kwargs(case, target, inputs["inputs"]),
                        assistant_model=drafter)
    except type(error):
        return Outcome(case, None, None, 1.0, 0.0)
    raise AssertionError(f"plain generate() raised {type(error).__name__} ({error}); with the draft it did not")


def agreement(expected: torch.LongTensor, out: torch.LongTensor, prompt_width: int) -> float:
    """Share of plain decoding's new tokens (over all rows) that come before a row's first difference."""
    agreed = total = 0
    for want, got in zip(expected[:, prompt_width:].tolist(), out[:, prompt_width:].tolist(), strict=True):
        total += len(want)
        for a, b in zip(want, got, strict=False):
            if a != b:
                break
            agreed += 1
    return agreed / max(total, 1)


def first_difference(expected: torch.LongTensor, out: torch.LongTensor) -> tuple[int, int] | None:
    length = min(expected.shape[1], out.shape[1])
    rows, cols = torch.nonzero(expected[:, :length] != out[:, :length], as_tuple=True)
    return (int(rows[0]), int(cols[0])) if rows.numel() else None


# Plain decoding's top two processed scores closer than this are a rounding tie: fp32 sums taken in another order
# (the tree forward vs one decode step, ~1e-6 apart on these models) may pick either token.
TIE_GAP = 1e-4


def processed_gap(case: Case, row: int, col: int) -> float:
    """Gap between plain decoding's top two processed scores (the logits processors applied) where it chose `col`."""
    target, inputs = target_for(case.family, case.dtype), input_kwargs(case)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        decoding = with_eos(case, target, inputs, decoding_kwargs(case))
        plain = seeded_generate(target, case, **inputs, **decoding, output_scores=True, return_dict_in_generate=True)
    scores = plain.scores[col - case.width][row]
    top = scores.float().topk(2).values
    return float(top[0] - top[1])


def mismatch(outcome: Outcome) -> str | None:
    """Why an outcome is not plain decoding's, or None. fp32 must be identical (but for rounding ties, recorded in
    `outcome.tie_gap`); bf16 outcomes only have to be well-formed."""
    case, expected, out = outcome.case, outcome.expected, outcome.out
    if expected is None:
        return None
    width = case.width
    if out.shape[0] != expected.shape[0] or not torch.equal(out[:, :width], expected[:, :width]):
        return f"case {case.index}: prompt rows changed or lost: {tuple(out.shape)} vs {tuple(expected.shape)}"
    if bool(((out < 0) | (out >= VOCAB)).any()):
        return f"case {case.index}: token ids outside the vocabulary"
    if case.dtype == "bf16" or torch.equal(out, expected):
        return None
    where = first_difference(expected, out)
    if where is None:
        return f"case {case.index}: shape {tuple(out.shape)} != plain {tuple(expected.shape)}; {case}"
    row, col = where
    gap = processed_gap(case, row, col)
    if gap < TIE_GAP and not case.sampling:
        outcome.tie_gap = gap
        return None
    return (f"case {case.index}: row {row} differs at column {col} (plain decoding's top-2 processed score gap "
            f"{gap:.2e}): got {out[row, width:].tolist()}, plain {expected[row, width:].tolist()}; {case}")


def check_case(case: Case) -> tuple[Outcome | None, str | None]:
    """Run a case; a crash is a failure like a mismatch (reported with its case, so it reproduces by index)."""
    try:
        outcome = run_case(case)
        return outcome, mismatch(outcome)
    except Exception as error:  # every crash is a finding, whatever its type
        return None, f"case {case.index}: {type(error).__name__}: {error}; {case}"


# ---------------------------------------------------------------------------------------------------------------------
# minimising a failure


def simpler_variants(case: Case) -> list[Case]:
    """Cases one step simpler than `case`, most drastic first."""
    r = functools.partial(dataclasses.replace, case)
    batch = len(case.prompt_lens)
    variants = []
    if batch > 1:
        variants += [r(prompt_lens=case.prompt_lens[:i] + case.prompt_lens[i + 1:], eos_row=0) for i in range(batch)]
    variants += [
        r(sampling=False), r(extra_pad=0), r(processor="none"), r(eos="none"), r(cached=0), r(old_cache_name=False),
        r(use_max_length=False), r(explicit_mask=False), r(dtype="fp32"), r(corrupt_every=0),
        fewer_new_tokens(case, case.max_new_tokens // 2), fewer_new_tokens(case, case.max_new_tokens - 1),
        r(tree_shape=case.tree_shape[:-1]), r(tree_shape=tuple(max(1, w // 2) for w in case.tree_shape)),
        r(prompt_lens=tuple(max(1, n // 2) for n in case.prompt_lens),
          cached=max(0, min(case.cached, case.prompt_lens[0] // 2 - 1))),
        r(prompt_lens=tuple(n - 1 for n in case.prompt_lens), cached=max(0, case.cached - 1)),
        r(sink=0), r(window=max(1, case.window // 2)),
    ]
    return [v for v in variants if v != case and valid_case(v)]


def fewer_new_tokens(case: Case, n: int) -> Case:
    return dataclasses.replace(case, max_new_tokens=n, eos_offset=min(case.eos_offset, n - 1))


def valid_case(case: Case) -> bool:
    return (len(case.tree_shape) > 0 and min(case.prompt_lens) >= 1 and case.max_new_tokens >= 1
            and 0 <= case.eos_offset < case.max_new_tokens and case.eos_row < len(case.prompt_lens)
            and (case.cached == 0 or (not case.padded and case.cached < case.prompt_lens[0]))
            and not (case.sampling and len(case.prompt_lens) > 1))


def minimise(case: Case, fails: Callable[[Case], bool]) -> Case:
    """Greedy shrinking: take the first simpler variant that still fails, until none does."""
    shrunk = True
    while shrunk:
        shrunk = False
        for variant in simpler_variants(case):
            if fails(variant):
                case, shrunk = variant, True
                break
    return case


# ---------------------------------------------------------------------------------------------------------------------
# known engine bugs: their cases are counted, not run, while a strict xfail test in test_fuzz.py pins each bug; when a
# fix makes that test pass (XPASS fails it), delete its entry here so the fuzz covers those cases again


# None open. (The fuzz's first two, per-row state of transformers' logits processors seen by a lone row, are fixed;
# their regression tests are test_batched_repetition_penalty_with_an_attention_mask and
# test_prefix_allowed_tokens_fn_gets_each_rows_batch_id.)
KNOWN_BUGS: dict[str, Callable[[Case], bool]] = {}


def known_bug(case: Case) -> str | None:
    return next((test for test, hits in KNOWN_BUGS.items() if hits(case)), None)


# ---------------------------------------------------------------------------------------------------------------------
# profiles


@dataclass
class Summary:
    start: int = 0  # the indices drawn are [start, stop)
    stop: int = 0
    cases: int = 0  # cases run (known bugs' cases are drawn, counted in `known`, and not run)
    exact: int = 0  # fp32 cases token-identical to plain generate()
    bf16: list[float] = dataclasses.field(default_factory=list)  # agreement of each greedy bf16 case
    bf16_sampled: int = 0  # well-formed only: one rounding difference changes a draw, and every token after it
    known: int = 0  # cases of a known bug, not run
    refused: int = 0  # cases plain generate() refuses (raises), as generate() with the draft does
    ties: list[str] = dataclasses.field(default_factory=list)  # fp32 cases that part at a rounding tie
    failures: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    per_family: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def bf16_agreement(self) -> float:
        return sum(self.bf16) / len(self.bf16) if self.bf16 else 1.0

    def line(self) -> str:
        families = ", ".join(f"{k} {v}" for k, v in sorted(self.per_family.items()))
        return (f"{self.cases} cases (indices [{self.start}, {self.stop}), {self.known} more of known bugs not run) "
                f"in {self.seconds:.0f} s: {len(self.failures)} failures; fp32 {self.exact} identical, "
                f"{len(self.ties)} parting at a rounding tie ({'; '.join(self.ties)}), {self.refused} refused by "
                f"plain generate() and with the draft alike; bf16 "
                f"{len(self.bf16)} greedy (+{self.bf16_sampled} sampled), agreement {self.bf16_agreement:.3f} "
                f"(min {min(self.bf16, default=1.0):.3f}); families: {families}")


def run_profile(start: int, count: int, seconds: float = float("inf"),
                progress: Callable[[Summary], None] | None = None, every: int = 500) -> Summary:
    """Run `count` cases from index `start` on (skipping known bugs' cases), or as many as fit in `seconds`.

    Failures are collected, not raised, so one run reports all of them."""
    import time

    summary = Summary(start=start, stop=start)
    began = time.perf_counter()
    while summary.cases < count and time.perf_counter() - began < seconds:
        case = draw_case(summary.stop)
        summary.stop += 1
        if known_bug(case):
            summary.known += 1
            continue
        summary.cases += 1
        summary.per_family[case.family] = summary.per_family.get(case.family, 0) + 1
        outcome, problem = check_case(case)
        if problem is not None:
            summary.failures.append(problem)
        elif outcome.expected is None:
            summary.refused += 1
        elif outcome.tie_gap is not None:
            summary.ties.append(f"case {case.index}: top-2 gap {outcome.tie_gap:.1e}")
        elif case.dtype == "bf16" and case.sampling:
            summary.bf16_sampled += 1
        elif case.dtype == "bf16":
            summary.bf16.append(outcome.agreement)
        else:
            summary.exact += 1
        summary.seconds = time.perf_counter() - began
        if progress is not None and summary.cases % every == 0:
            progress(summary)
    summary.seconds = time.perf_counter() - began
    return summary


def main(argv: list[str]) -> None:
    """`python tests/fuzz_cases.py INDEX [--minimise]`: show one case, its result, and optionally its shrunk form."""
    torch.set_num_threads(1)
    case = draw_case(int(argv[0]))
    print(case)
    outcome, problem = check_case(case)
    print(problem or f"ok: agreement {outcome.agreement:.3f}, tau {outcome.tau:.2f}")
    if problem and "--minimise" in argv:
        print(minimise(case, lambda c: check_case(c)[1] is not None))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
