"""Which causal LMs of the installed transformers the engine serves, checked on tiny random models.

Every model type of transformers' causal-LM mapping is built from its own config class with its size fields shrunk
(the family's special features kept on: logit soft-capping, attention sinks, sliding windows shorter than the prompt,
mixed layer types, MoE, MLA), then greedy ``generate()`` runs with and without a draft: a random LongSpec draft as a
chain, as a tree and with the default ``tree_shape="auto"``, and the target as its own draft
(:class:`~longspec_hf.SelfDraft`, whose drafts are mostly accepted, so long accepted paths and cache compaction are
exercised too). Each family ends in exactly one outcome:

* ``identical``: every drafted run gave plain ``generate()``'s tokens;
* ``identical with SelfDraft``: the target drafting for itself is identical, a LongSpec draft is refused (its
  cross-attention cannot read the target's cache, e.g. latent attention);
* ``refused``: the engine said why before the first round (``from_target`` / the binding check);
* ``unbuildable``: no tiny model could be built from the config class (the reason is kept);
* ``mismatch`` / ``error``: a bug — other tokens than plain decoding, or a failure inside a round.

``python -m longspec_hf.families`` (or ``longspec families``) writes the support table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import traceback
import warnings
from dataclasses import dataclass

import torch

# Size fields and the tiny value each gets, whatever the family calls them. Kept consistent: 4 heads of 16 dims over
# a 64-wide residual stream, 2 KV heads (GQA).
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 64, 4, 2, 16, 128, 2
VOCAB = 128
WINDOW = 8  # sliding windows and attention chunks: shorter than every prompt of the sweep
SIZE_FIELDS = {
    "hidden_size": HIDDEN, "n_embd": HIDDEN, "d_model": HIDDEN, "n_embed": HIDDEN, "embed_dim": HIDDEN,
    "intermediate_size": FFN, "ffn_dim": FFN, "n_inner": FFN, "ffn_hidden_size": FFN, "d_ff": FFN,
    "num_attention_heads": HEADS, "n_head": HEADS, "n_heads": HEADS, "num_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "num_kv_heads": KV_HEADS, "n_kv_heads": KV_HEADS,
    "multi_query_group_num": KV_HEADS,
    "head_dim": HEAD_DIM, "kv_channels": HEAD_DIM,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "n_layers": LAYERS, "num_layers": LAYERS,
    "decoder_layers": LAYERS, "encoder_layers": LAYERS, "decoder_attention_heads": HEADS,
    "encoder_attention_heads": HEADS, "decoder_ffn_dim": FFN, "encoder_ffn_dim": FFN,
    "vocab_size": VOCAB,
    "max_position_embeddings": 512, "n_positions": 512, "max_seq_len": 512, "seq_length": 512,
    # MoE: a few small experts, all layers sparse where the family allows it
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_k": 2, "moe_topk": 2, "top_k": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "n_group": 1, "topk_group": 1, "n_shared_experts": 1, "num_shared_experts": 1,
    # multi-head latent attention (DeepSeek-style)
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16,
    # per-layer inputs and other side widths some families carry
    "hidden_size_per_layer_input": 8, "laurel_rank": 8, "altup_num_inputs": 2, "vocab_size_per_layer_input": VOCAB,
    "num_kv_shared_layers": 0,
}
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")
WINDOW_FIELDS = ("sliding_window", "attention_chunk_size", "window_size", "local_window_size")
SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": None}
# Whatever a multimodal config nests besides its text model gets the same treatment.
SUB_CONFIGS = ("text_config", "vision_config", "audio_config", "speech_config", "vq_config",
               "encoder_config", "decoder_config", "global_config", "patcher_config")

# Features a family's default config leaves off or too weak to matter in a tiny model, switched on: soft-capping
# that bites (a cap near the tiny model's score range), sliding layers mixed with global ones, hybrid layers.
FEATURES = {
    # (Gemma's scaled embeddings drown a wide init's attention: its usual init keeps the greedy output varied.)
    "gemma2": {"attn_logit_softcapping": 0.1, "query_pre_attn_scalar": 1, "initializer_range": 0.02},
    "vaultgemma": {"attn_logit_softcapping": 0.1, "query_pre_attn_scalar": 1, "initializer_range": 0.02},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1, "layer_types": None},
    "qwen3": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1, "layer_types": None},
    "lfm2": {"full_attn_idxs": [1], "layer_types": None},
    "blt": {"encoder_hash_byte_group_vocab": 64},  # a 500k-row hash embedding per n-gram size otherwise
}

# Constructor-only settings (not kept as config fields): Gemma 4's wider global layers, at tiny size.
_GEMMA4 = {"global_head_dim": 2 * HEAD_DIM, "num_kv_shared_layers": 1}
CONSTRUCTOR_FEATURES = {t: _GEMMA4 for t in ("gemma4_text", "gemma4_unified_text")}

IDENTICAL, REFUSED, UNBUILDABLE, MISMATCH, ERROR = "identical", "refused", "unbuildable", "mismatch", "error"
SELF_DRAFT_ONLY = "identical with SelfDraft"  # the target drafting for itself is served, a LongSpec draft is not


@dataclass
class FamilyResult:
    model_type: str
    outcome: str
    detail: str = ""


def shrunk_kinds(kinds_per_layer: list, layers: int) -> list:
    """`layers` entries that keep every kind a per-layer list mixes, in their order of first appearance, cycled.

    The last layer keeps the family's last kind: a LongSpec draft cross-attends to the last layer's KV.
    """
    kinds = list(dict.fromkeys(map(_hashable, kinds_per_layer)))
    by_key = {_hashable(k): k for k in kinds_per_layer}
    cycled = [kinds[i % len(kinds)] for i in range(layers)]
    if len(kinds) > 1:
        cycled[-1] = _hashable(kinds_per_layer[-1])
        for i, kind in enumerate(k for k in kinds if k not in cycled):
            cycled[i] = kind
    return [by_key[k] for k in cycled]


def _hashable(value):
    return repr(value) if isinstance(value, list | dict) else value


def _get(config, name):
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - per-layer attributes refuse global reads
        return None


def _has(config, name) -> bool:
    try:
        return hasattr(config, name)
    except Exception:  # noqa: BLE001 - per-layer attributes refuse global reads
        return True


def _set(config, name, value) -> bool:
    """Set a field that the config really has as a field (not a read-only property); False if it cannot be set."""
    if isinstance(getattr(type(config), name, None), property):
        return False
    try:
        setattr(config, name, value)
    except Exception:  # noqa: BLE001
        return False
    return True


def shrink(config, layers: int = LAYERS) -> None:
    """Shrink `config` (and its nested configs) in place to a tiny model of the same family."""
    for name in SUB_CONFIGS:
        sub = _get(config, name)
        if sub is not None and hasattr(sub, "to_dict"):
            shrink(sub, layers)
    original_layers = next((_get(config, n) for n in LAYER_FIELDS if isinstance(_get(config, n), int)), None)
    per_layer = {name: value for name, value in vars(config).items()
                 if isinstance(value, list | tuple) and original_layers and len(value) == original_layers
                 and len(value) > 1}
    kinds = max((len(set(map(_hashable, v))) for v in per_layer.values()), default=1)
    count = max(layers, kinds + 1) if kinds > 1 else layers
    for name, value in SIZE_FIELDS.items():
        if name in LAYER_FIELDS:
            value = count
        if _get(config, name) is not None or name in ("head_dim", "num_key_value_heads"):
            if _has(config, name):
                _set(config, name, value)
    if any(isinstance(_get(config, n), int) for n in ("num_experts", "num_local_experts", "n_routed_experts")):
        _set(config, "num_experts_per_tok", SIZE_FIELDS["num_experts_per_tok"])
    if isinstance(_get(config, "kv_lora_rank"), int):
        # Latent attention rotates qk_rope_head_dim dims per head and caches one KV head per query head.
        _set(config, "head_dim", SIZE_FIELDS["qk_rope_head_dim"])
        _set(config, "num_key_value_heads", HEADS)
    if isinstance(_get(config, "rotary_dim"), int):
        _set(config, "rotary_dim", HEAD_DIM // 2)
    for name in WINDOW_FIELDS:
        if isinstance(_get(config, name), int):
            _set(config, name, WINDOW)
    for name, value in SPECIAL_TOKENS.items():
        if _has(config, name):
            _set(config, name, value)
    for name, value in per_layer.items():
        _set(config, name, shrunk_kinds(list(value), count))
    # A wide init spreads the logits, so fp32 reorderings of the same sums never flip a greedy argmax.
    if _has(config, "initializer_range"):
        _set(config, "initializer_range", 0.2)


def tiny_model(model_type: str, seed: int = 0):
    """A tiny random causal LM of `model_type` in fp32, eval mode, with no EOS (runs always reach their length)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.for_model(model_type)
    shrink(config)
    for name, value in FEATURES.get(model_type, {}).items():
        setattr(config, name, value)
    # The config classes validate on init: rebuilding from the shrunk dict re-derives dependent fields (per-layer
    # overrides too: they name layers of the full-size model).
    values = _without_per_layer_overrides(config.to_dict())
    values.update(CONSTRUCTOR_FEATURES.get(model_type, {}))
    config = type(config).from_dict(values)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config = GenerationConfig(pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return model


def _without_per_layer_overrides(values: dict) -> dict:
    values.pop("per_layer_config", None)
    for name in SUB_CONFIGS:
        if isinstance(values.get(name), dict):
            _without_per_layer_overrides(values[name])
    return values


def prompt_ids(length: int, vocab: int, seed: int = 0) -> torch.LongTensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, min(vocab, VOCAB), (1, length), generator=g)


def _drafted_runs(target):
    """The drafted runs of the sweep: (name, drafter factory)."""
    from .modeling import LongSpecDraftModel
    from .self_draft import SelfDraft

    def longspec(tree_shape):
        def make():
            torch.manual_seed(1)
            draft = LongSpecDraftModel.from_target(target, sink_size=2, window_size=6)
            draft.generation_config.tree_shape = tree_shape
            return draft
        return make

    return [
        ("chain", longspec([1, 1, 1])),
        ("tree", longspec([2, 3, 2])),
        ("auto", longspec("auto")),  # the default: its first use also reads the config for its cost model's key
        ("self-draft", lambda: SelfDraft.from_target(target, sink_size=2, window_size=6, tree_shape=[2, 2, 1, 1])),
    ]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _engine_frame(err: BaseException) -> str:
    """Where a traceback ends, to tell a refusal raised on purpose from a failure deep inside."""
    frames = traceback.extract_tb(err.__traceback__)
    return f"{frames[-1].filename.rsplit('/', 2)[-2:]}:{frames[-1].lineno}" if frames else ""


def is_refusal(err: BaseException) -> bool:
    """A refusal is a ValueError the engine raises on purpose while binding, before any round."""
    from .support import UnsupportedTargetError

    return isinstance(err, UnsupportedTargetError)


def check_family(model_type: str, prompt_length: int = 40, new_tokens: int = 12) -> FamilyResult:
    """Build a tiny `model_type` and compare drafted greedy runs with plain greedy ``generate()``."""
    import longspec_hf  # noqa: F401  (routes generate(assistant_model=...))

    from .support import check_declared_support

    # Tiny tensors: intra-op threads only add overhead, which explodes when the cores are shared (--jobs).
    torch.set_num_threads(1)

    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            target = tiny_model(model_type)
    except Exception as err:  # noqa: BLE001 - any failure of the family's own code to build makes it unbuildable
        return FamilyResult(model_type, UNBUILDABLE, _first_line(err))
    try:  # what the family is, before whether a tiny one runs
        check_declared_support(target)
    except Exception as err:  # noqa: BLE001
        if is_refusal(err):
            return FamilyResult(model_type, REFUSED, str(err).strip().splitlines()[0])
        return FamilyResult(model_type, ERROR, f"support check: {_first_line(err)} at {_engine_frame(err)}")
    vocab = target.config.get_text_config(decoder=True).vocab_size
    input_ids = prompt_ids(prompt_length, vocab)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = target.generate(input_ids, do_sample=False, max_new_tokens=new_tokens)
    except Exception as err:  # noqa: BLE001
        return FamilyResult(model_type, UNBUILDABLE, f"plain generate() fails: {_first_line(err)}")
    refusals = {}
    for name, make in _drafted_runs(target):
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                drafted = target.generate(input_ids, do_sample=False, max_new_tokens=new_tokens,
                                          assistant_model=make())
        except Exception as err:  # noqa: BLE001
            if is_refusal(err):
                refusals[name] = str(err).strip().splitlines()[0]
                continue
            return FamilyResult(model_type, ERROR, f"{name}: {_first_line(err)} at {_engine_frame(err)}")
        if not torch.equal(drafted, plain):
            return FamilyResult(model_type, MISMATCH, f"{name}: other tokens than plain generate()")
    if len(refusals) == len(_drafted_runs(target)):
        return FamilyResult(model_type, REFUSED, next(iter(refusals.values())))
    if refusals:
        return FamilyResult(model_type, SELF_DRAFT_ONLY, f"LongSpec drafts refused: {next(iter(refusals.values()))}")
    return FamilyResult(model_type, IDENTICAL)


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def support_table(results: list[FamilyResult]) -> str:
    """Markdown: counts per outcome, then one row per family."""
    import transformers

    counts = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    summary = ", ".join(f"{counts[k]} {k}" for k in (IDENTICAL, SELF_DRAFT_ONLY, REFUSED, UNBUILDABLE, MISMATCH, ERROR)
                        if k in counts)
    lines = [f"transformers {transformers.__version__}, {len(results)} causal-LM model types: {summary}.", "",
             "| model type | outcome | why |", "|---|---|---|"]
    for r in results:
        lines.append(f"| `{r.model_type}` | {r.outcome} | {r.detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def reason(detail: str) -> str:
    """A refusal's reason without the model class it names first, so that families refused alike group together."""
    first, _, rest = detail.partition(" ")
    if first.endswith(("'s", "CausalLM", "Model", "LMHeadModel", "Decoder")) or first[:1].isupper() and rest:
        return rest.split("; use ")[0].split(", so ")[0].strip()
    return detail.split("; use ")[0].strip()


def support_summary(results: list[FamilyResult]) -> str:
    """Markdown for the README: the counts, then one row per outcome and reason with the model types it covers."""
    head = support_table(results).split("\n", 1)[0]
    groups: dict[tuple[str, str], list[str]] = {}
    for r in results:
        if r.outcome in (REFUSED, SELF_DRAFT_ONLY):
            why = reason(r.detail.removeprefix("LongSpec drafts refused: "))
        else:
            why = r.detail[:100]
        groups.setdefault((r.outcome, why), []).append(r.model_type)
    order = (IDENTICAL, SELF_DRAFT_ONLY, REFUSED, UNBUILDABLE, MISMATCH, ERROR)
    lines = [head, "", "| outcome | model types | why |", "|---|---|---|"]
    for (outcome, why), types in sorted(groups.items(), key=lambda item: (order.index(item[0][0]), -len(item[1]))):
        names = ", ".join(f"`{t}`" for t in types)
        lines.append(f"| {outcome} ({len(types)}) | {names} | {why.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _checked_in_pool(context, model_types, timeout, jobs, results, log) -> None:
    """Check `model_types` in one pool until they are done or a worker hangs or dies (the pool is then dropped)."""
    import multiprocessing as mp

    with context.Pool(jobs, maxtasksperchild=25) as pool:
        futures = [(t, pool.apply_async(check_family, (t,))) for t in model_types]
        for model_type, future in futures:
            healthy = False
            try:
                result, healthy = future.get(timeout), True
            except mp.TimeoutError:
                result = FamilyResult(model_type, UNBUILDABLE, f"no result within {timeout:.0f} s (too slow or big)")
            except Exception as err:  # noqa: BLE001 - the worker died (e.g. out of memory)
                result = FamilyResult(model_type, UNBUILDABLE, f"the worker died: {_first_line(err)}")
            results[model_type] = result
            if log is not None:
                print(f"{result.model_type}: {result.outcome} {result.detail}", file=log, flush=True)
            if not healthy:
                pool.terminate()
                return


def sweep(model_types: list[str], timeout: float = 600.0, jobs: int = 1, log=None) -> list[FamilyResult]:
    """:func:`check_family` for each type, in worker processes: a family that hangs or exhausts memory costs only
    itself (reported as unbuildable after `timeout` seconds)."""
    import multiprocessing as mp

    context = mp.get_context("spawn")
    results: dict[str, FamilyResult] = {}
    while len(results) < len(model_types):
        _checked_in_pool(context, [t for t in model_types if t not in results], timeout, jobs, results, log)
    return [results[t] for t in model_types]


def families_command(args) -> None:
    """``longspec families``: check the model types, print or write the table; exits 1 on a mismatch or an error."""
    results = sweep(args.model_types or causal_lm_types(), timeout=args.timeout, jobs=args.jobs, log=sys.stderr)
    table = support_table(results) if not args.summary else support_summary(results)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table)
    else:
        print(table)
    if any(r.outcome in (MISMATCH, ERROR) for r in results):
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    from longspec_hf_cli import add_families_arguments

    parser = argparse.ArgumentParser(prog="python -m longspec_hf.families", description=__doc__.split("\n\n")[0])
    add_families_arguments(parser)
    families_command(parser.parse_args(argv))


if __name__ == "__main__":
    main()
