"""One benchmark run: every method on the same prompts, in one process, against a baseline measured in the same run.

Per workload, context length and prompt:

1. the prompt's KV (all tokens but the last) is prefilled once, timed: that is every method's prefill time;
2. each method continues its own copy of that prompt cache (copying is not timed) and generates `max_new_tokens`
   greedy tokens — decode time; methods that cannot continue a prompt cache prefill themselves and their decode
   time is their end-to-end time minus the measured prefill;
3. per method: decode tokens/s, speed-up over the baseline on the same prompt (decode-only and end-to-end), tau
   (new tokens per full target forward, counted at the target's last layer), peak memory, the draft's KV-cache bytes,
   and whether its tokens equal the baseline's.

Warm-up calls (one short prompt per method; a full call per context length for methods that compile per shape) are
not reported.
"""

from __future__ import annotations

import copy
import platform
import statistics
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from ..cache import kv_bytes
from ..compat import cache_kwarg
from .measure import count_target_forwards, peak_memory, timed
from .methods import BASELINE, Method, autoregressive

SCHEMA = "longspec-bench/1"


@dataclass
class BenchSettings:
    contexts: list[int]
    max_new_tokens: int = 64
    prompts_per_context: int = 3
    warmup: bool = True


def environment(target) -> dict:
    import transformers

    from .. import __version__

    device = target.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "longspec_hf": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
        "device_name": name, "dtype": str(target.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "target": getattr(target.config, "_name_or_path", None) or target.config.model_type,
        "target_attn_implementation": target.config._attn_implementation,
    }


def prefill(target, input_ids: torch.LongTensor) -> tuple[DynamicCache, float]:
    """KV of `input_ids[:, :-1]` and the seconds it took; the last token is left for each method's first forward."""
    cache = DynamicCache()
    with torch.no_grad(), timed(target.device) as clock:
        target(input_ids[:, :-1], use_cache=True, logits_to_keep=1, **{cache_kwarg(target): cache})
    return cache, clock["seconds"]


def private_cache(target, method: Method, prompt_cache, input_ids, max_new_tokens: int):
    """The method's own copy of the prompt cache, made before the clock starts; None if the method prefills itself."""
    if not method.uses_prompt_cache:
        return None
    if method.prepare_cache is not None:
        return method.prepare_cache(target, prompt_cache, input_ids, max_new_tokens)
    return copy.deepcopy(prompt_cache)


def run_method(target, method: Method, input_ids, prompt_cache, prefill_seconds: float, max_new_tokens: int) -> dict:
    cache = private_cache(target, method, prompt_cache, input_ids, max_new_tokens)
    counting = count_target_forwards(target) if method.hook_forwards else nullcontext({"forwards": None})
    with torch.no_grad(), peak_memory(target.device) as memory, counting as forwards, timed(target.device) as clock:
        output = method.generate(target, input_ids, cache, max_new_tokens)
    seconds = clock["seconds"]
    if method.uses_prompt_cache:
        decode, timing = seconds, "measured"
    elif seconds - prefill_seconds >= 0.1 * seconds:
        decode, timing = seconds - prefill_seconds, "end_to_end_minus_prefill"
    else:
        # Prefill is not separable from this method's run (a tiny model, timer noise): rather than divide by
        # almost nothing, count the whole call as decode time, which understates this method's decode speed.
        decode, timing = seconds, "end_to_end"
    new = output.sequences[:, input_ids.shape[1]:]
    draft_bytes = output.draft_cache_bytes
    if draft_bytes is None and method.draft_cache_bytes is not None:
        draft_bytes = method.draft_cache_bytes(prompt_cache)
    return {
        "tokens": new[0].tolist(),
        "new_tokens": int(new.shape[1]),
        "decode_seconds": decode,
        "end_to_end_seconds": seconds + (prefill_seconds if method.uses_prompt_cache else 0.0),
        "decode_timing": timing,
        # A drafter that runs the target's own layers (SelfDraft) would be counted by the layer hook: ask it.
        "target_forwards": forwards["forwards"] if output.target_forwards is None else output.target_forwards,
        "peak_memory_bytes": memory["peak_bytes"],
        "draft_cache_bytes": draft_bytes,
        **({"tree_shapes": output.tree_shapes} if output.tree_shapes else {}),
        **({"predicted_accepted": list(output.predicted_accepted)} if output.predicted_accepted else {}),
    }


def warm_up(target, methods: list[Method], input_ids: torch.LongTensor) -> None:
    """One short call per method: first-call costs (allocations, kernel selection, lazy imports) are not reported.
    Methods that compile per shape are left to :func:`warm_up_context`."""
    ids = input_ids[:, : min(64, input_ids.shape[1])].to(target.device)
    cache, seconds = prefill(target, ids)
    for method in methods:
        if method.warmup == "once":
            run_method(target, method, ids, cache, seconds, 4)


def warm_up_context(target, methods: list[Method], input_ids, prompt_cache, prefill_seconds: float,
                    max_new_tokens: int) -> None:
    """A full untimed call of each per-shape method at this context length (its compilation for this shape)."""
    for method in methods:
        if method.warmup == "per_context":
            run_method(target, method, input_ids, prompt_cache, prefill_seconds, max_new_tokens)


def run_bench(target, tokenizer, methods: list[Method], workloads: list, settings: BenchSettings,
              progress: bool = True) -> dict:
    """Benchmark `methods` on `workloads` at each context length; returns the JSON-ready result (see `SCHEMA`).

    The baseline (plain greedy ``generate()``) is always run first, even if `methods` leaves it out: every speed-up
    and correctness figure is relative to it on the same prompt, in the same run.
    """
    from tqdm.auto import tqdm

    target.eval()
    runnable = [m for m in methods if m.skip_reason is None and m.name != BASELINE]
    baseline = next((m for m in methods if m.name == BASELINE), None) or autoregressive()
    runnable = [baseline] + runnable
    skipped = [{"method": m.name, "reason": m.skip_reason} for m in methods if m.skip_reason is not None]
    prompt_sets = [(w, c, w.prompts(tokenizer, c, settings.prompts_per_context))
                   for w in workloads for c in settings.contexts]
    if settings.warmup and prompt_sets:
        warm_up(target, runnable, prompt_sets[0][2][0])
    runs, warmed_contexts = [], set()
    total = sum(len(p) for _, _, p in prompt_sets) * len(runnable)
    with tqdm(total=total, desc="bench", disable=not progress) as bar:
        for workload, context, prompts in prompt_sets:
            for index, input_ids in enumerate(prompts):
                input_ids = input_ids.to(target.device)
                prompt_cache, prefill_seconds = prefill(target, input_ids)
                if settings.warmup and context not in warmed_contexts:
                    warmed_contexts.add(context)
                    warm_up_context(target, runnable, input_ids, prompt_cache, prefill_seconds,
                                    settings.max_new_tokens)
                reference = None
                for method in runnable:
                    bar.set_postfix_str(f"{workload.name} {context} {method.name}")
                    run = run_method(target, method, input_ids, prompt_cache, prefill_seconds,
                                     settings.max_new_tokens)
                    if reference is None:
                        reference = run
                    run.update({
                        "method": method.name, "workload": workload.name, "context": context, "prompt": index,
                        "prompt_tokens": int(input_ids.shape[1]), "prefill_seconds": prefill_seconds,
                        "target_kv_bytes": kv_bytes(prompt_cache),
                        "identical": run["tokens"] == reference["tokens"],
                        "agreement": agreement(run["tokens"], reference["tokens"]),
                        "speedup_decode": reference["decode_seconds"] / run["decode_seconds"],
                        "speedup_end_to_end": reference["end_to_end_seconds"] / run["end_to_end_seconds"],
                    })
                    runs.append(run)
                    bar.update(1)
                del prompt_cache
    return {
        "schema": SCHEMA,
        "environment": environment(target),
        "settings": asdict(settings),
        "methods": [{"name": m.name, "uses_prompt_cache": m.uses_prompt_cache, **m.settings} for m in runnable],
        "skipped": skipped,
        "runs": runs,
        "summary": summarize(runs),
    }


def agreement(tokens: list[int], reference: list[int]) -> float:
    """Fraction of positions where a method's greedy tokens equal the baseline's (1.0 for lossless methods)."""
    return sum(a == b for a, b in zip(tokens, reference, strict=False)) / max(1, len(reference))


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (workload, context, method): medians and ranges over prompts, tau pooled over prompts."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["workload"], run["context"], run["method"]), []).append(run)
    rows = []
    for (workload, context, method), group in groups.items():
        tokens = sum(r["new_tokens"] for r in group)
        memories = [r["peak_memory_bytes"] for r in group if r["peak_memory_bytes"] is not None]
        draft_bytes = [r["draft_cache_bytes"] for r in group if r["draft_cache_bytes"] is not None]
        rows.append({
            "workload": workload, "context": context, "method": method, "prompts": len(group),
            "tau": tokens / max(1, sum(r["target_forwards"] for r in group)),
            "tokens_per_second": spread([r["new_tokens"] / r["decode_seconds"] for r in group]),
            "speedup_decode": spread([r["speedup_decode"] for r in group]),
            "speedup_end_to_end": spread([r["speedup_end_to_end"] for r in group]),
            "peak_memory_bytes": max(memories) if memories else None,
            "draft_cache_bytes": max(draft_bytes) if draft_bytes else None,
            "target_kv_bytes": max(r["target_kv_bytes"] for r in group),
            "identical": all(r["identical"] for r in group),
            "agreement": statistics.mean(r["agreement"] for r in group),
            "decode_timing": group[0]["decode_timing"],
            **({"tree_shapes": shapes} if (shapes := merged_counts(r.get("tree_shapes") for r in group)) else {}),
            **calibration(group),
        })
    return rows


def calibration(group: list[dict]) -> dict:
    """Under tree_shape="auto": accepted tokens of the draft's trees predicted by its acceptance model vs accepted
    (lookup-branch tokens apart), over prompts."""
    pairs = [r["predicted_accepted"] for r in group if "predicted_accepted" in r]
    if not pairs:
        return {}
    return {"predicted_accepted": sum(p for p, _ in pairs), "accepted_tokens": sum(a for _, a in pairs)}


def merged_counts(counts) -> dict[str, int]:
    """Rounds per tree shape summed over prompts, most used first."""
    total: dict[str, int] = {}
    for count in counts:
        for name, n in (count or {}).items():
            total[name] = total.get(name, 0) + n
    return dict(sorted(total.items(), key=lambda item: -item[1]))
