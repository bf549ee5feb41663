"""Every causal LM of transformers: lossless or refused up front (see ``longspec_hf.families``).

The default run checks one family per distinct attention feature; the full sweep over every causal-LM model type of
the installed transformers runs with the tests too (about a minute on two cores).
"""

from __future__ import annotations

import pytest
import torch

from longspec_hf.families import (
    ERROR,
    IDENTICAL,
    MISMATCH,
    REFUSED,
    SELF_DRAFT_ONLY,
    causal_lm_types,
    check_family,
    prompt_ids,
    shrunk_kinds,
    support_table,
    sweep,
    tiny_model,
)

# One family per attention feature the engine implements or refuses, and the outcome it must have.
FEATURES = {
    "llama": IDENTICAL,  # the reference shape
    "gemma2": IDENTICAL,  # logit soft-capping that bites, sliding and global layers mixed
    "gemma3_text": IDENTICAL,  # one rotary per layer type
    "gpt_oss": IDENTICAL,  # attention sinks (s_aux), yarn rotary in half-size tables, sliding layers
    "phi": IDENTICAL,  # partial rotary, cut off in the attention module
    "glm4": IDENTICAL,  # partial rotary with interleaved halves
    "qwen2": IDENTICAL,  # sliding layers from max_window_layers
    "gemma4_text": IDENTICAL,  # layers of different head dims, KV shared across layers, a one-tensor rotary function
    "beam": IDENTICAL,  # global layers without rotary (NoPE) after rotary sliding ones
    "moshi": SELF_DRAFT_ONLY,  # a window applied through the mask alone (no sliding_window argument); no rotary module
    "gemma3n_text": IDENTICAL,  # MLP widths per layer
    "deepseek_v3": SELF_DRAFT_ONLY,  # latent attention: a LongSpec draft cannot read its cache, SelfDraft can
    "minimax": REFUSED,  # linear-attention layers
    "nemotron": REFUSED,  # attention layers that drop the forward's keyword arguments
}


@pytest.mark.parametrize("model_type", sorted(FEATURES))
def test_one_family_per_attention_feature(model_type):
    result = check_family(model_type)
    assert result.outcome == FEATURES[model_type], result.detail
    if result.outcome == REFUSED:
        assert "use" in result.detail  # the one line names what to use instead


def test_the_soft_cap_bites_in_the_sweeps_gemma2():
    """A cap that never bites would let a tree path that drops it pass: the sweep's Gemma 2 tokens depend on it."""
    target = tiny_model("gemma2")
    ids = prompt_ids(40, target.config.vocab_size)
    capped = target.generate(ids, do_sample=False, max_new_tokens=12)
    for layer in target.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert not torch.equal(capped, target.generate(ids, do_sample=False, max_new_tokens=12))


@pytest.mark.parametrize("model_type", ["gemma2", "gpt_oss"])
def test_verification_logits_equal_a_plain_forward(model_type, monkeypatch):
    """Soft-capping (Gemma 2) and sinks (gpt-oss) change the logits, and tree verification reproduces them: the logits
    of a verified chain equal those of one plain forward over prefix + chain; dropping the input would not."""
    from longspec_hf import attention
    from longspec_hf.cache import PreallocatedCache
    from longspec_hf.compat import cache_kwarg
    from longspec_hf.tree import DraftTree
    from longspec_hf.verify import TargetState, verify_tree

    target = tiny_model(model_type)
    ids = prompt_ids(30, target.config.vocab_size)  # longer than the sweep's sliding windows
    prefix, chain = ids[:, :26], ids[:, 26:]
    with torch.no_grad():
        plain = target(ids).logits[:, 26:].float()

        def verified():
            cache = PreallocatedCache(64)
            target(input_ids=prefix[:, :-1], use_cache=True, **{cache_kwarg(target): cache})
            state = TargetState(cache=cache, valid=None, slot_positions=torch.arange(25)[None],
                                next_positions=torch.tensor([25]))
            n = chain.shape[1] + 1
            tree = DraftTree(tokens=torch.cat([prefix[:, -1:], chain], dim=-1), parents=torch.arange(-1, n - 1)[None],
                             depths=torch.arange(n), ancestors=torch.ones(n, n, dtype=torch.bool).tril()[None],
                             logprobs=torch.zeros(1, n))
            return verify_tree(target, state, tree)[:, 1:]

        torch.testing.assert_close(verified(), plain, atol=1e-4, rtol=0)
        original = attention.hybrid_tree_attention

        def dropping(*args, softcap=None, s_aux=None, **kwargs):
            return original(*args, **kwargs)

        monkeypatch.setattr(attention, "hybrid_tree_attention", dropping)
        attention.register_hybrid_attention()
        try:
            assert (verified() - plain).abs().max() > 1e-2, "the input must change the logits"
        finally:
            monkeypatch.undo()
            attention.register_hybrid_attention()


def test_refusals_come_before_any_round():
    from longspec_hf import LongSpecDraftModel, SelfDraft
    from longspec_hf.support import UnsupportedTargetError

    target = tiny_model("minimax")
    with pytest.raises(UnsupportedTargetError, match="linear-attention layers"):
        LongSpecDraftModel.from_target(target)
    with pytest.raises(UnsupportedTargetError, match="linear-attention layers"):
        SelfDraft.from_target(target)
    target = tiny_model("deepseek_v3")
    with pytest.raises(UnsupportedTargetError, match="SelfDraft.from_target"):
        LongSpecDraftModel.from_target(target)


def test_per_layer_lists_keep_every_kind_and_the_last_one():
    kinds = ["sliding_attention"] * 5 + ["full_attention"]
    assert shrunk_kinds(kinds, 3) == ["sliding_attention", "full_attention", "full_attention"]
    assert shrunk_kinds(["a", "b", "c", "a"], 3) == ["c", "b", "a"]
    assert shrunk_kinds(["full_attention"] * 4, 2) == ["full_attention"] * 2


def test_support_table_counts_each_outcome():
    from longspec_hf.families import FamilyResult

    table = support_table([FamilyResult("a", IDENTICAL), FamilyResult("b", REFUSED, "why | not")])
    assert "2 causal-LM model types: 1 identical, 1 refused." in table
    assert "| `b` | refused | why / not |" in table


# Long-context families people run, each with a feature a Llama lacks: soft-capping, sliding/global layers with
# per-layer-type rotary, sinks, partial rotary.
MUST_BE_IDENTICAL = ("gemma2", "gemma3_text", "gpt_oss", "phi", "gpt_neox", "glm4", "olmo3")


def test_every_causal_lm_is_lossless_or_refused(tmp_path):
    """The whole sweep (about a minute on two cores): no family of the installed transformers gives other tokens or a
    traceback from inside the engine."""
    results = sweep(causal_lm_types(), jobs=2, timeout=300)
    bad = [r for r in results if r.outcome in (MISMATCH, ERROR)]
    (tmp_path / "support.md").write_text(support_table(results))
    assert not bad, "\n".join(f"{r.model_type}: {r.outcome} {r.detail}" for r in bad)
    outcomes = {r.model_type: r.outcome for r in results}
    assert all(outcomes[t] == IDENTICAL for t in MUST_BE_IDENTICAL), {t: outcomes[t] for t in MUST_BE_IDENTICAL}


def test_the_command_writes_the_table(tmp_path):
    import longspec_hf_cli

    output = tmp_path / "support.md"
    longspec_hf_cli.main(["families", "llama", "--output", str(output)])
    assert "| `llama` | identical |  |" in output.read_text()
