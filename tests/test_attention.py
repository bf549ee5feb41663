"""Hybrid tree attention equals dense masked attention (fp32, <= 1e-5) on every CPU backend, MHA and GQA."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM

from longspec_hf import attention
from longspec_hf.attention import (
    HYBRID_ATTENTION_NAME,
    available_backends,
    hybrid_tree_attention,
    merge_attention_states,
    register_hybrid_attention,
)

NEG = torch.finfo(torch.float32).min
D = 16
SCALE = 0.3
BACKENDS = sorted(set(available_backends("cpu")) | {"auto"})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: intra-op threads only add overhead, which explodes when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_reference(q, k, v, mask, scale=SCALE):
    """Independent reference: KV heads expanded, fp32 softmax over all P + q keys with the full additive mask."""
    g = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    scores = q.float() @ k.transpose(-1, -2) * scale + mask.float()
    return (scores.softmax(-1) @ v).transpose(1, 2)  # [B, q, H, D]


def random_tree(q_len, g):
    """Parents of a random tree: node i hangs under an earlier node, or under none (a new root)."""
    return [-1] + [int(torch.randint(-1, i, (1,), generator=g)) for i in range(1, q_len)]


def ancestor_mask(parents):
    """Additive `[q, q]` mask: each node sees itself and its ancestors."""
    n = len(parents)
    sees = torch.eye(n, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            sees[i] |= sees[parent]
    return torch.zeros(n, n).masked_fill(~sees, NEG)


def depths(parents):
    out = []
    for parent in parents:
        out.append(0 if parent < 0 else out[parent] + 1)
    return torch.tensor(out)


def make_case(b, h, hkv, p, q_len, padded=False, window=None, seed=0):
    """Random q/k/v and the full `[B, 1, q, P + q]` mask (prefix visible unless padded / windowed)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, q_len, D, generator=g)
    k = torch.randn(b, hkv, p + q_len, D, generator=g)
    v = torch.randn(b, hkv, p + q_len, D, generator=g)
    mask = torch.zeros(b, 1, q_len, p + q_len)
    parents = random_tree(q_len, g)
    mask[..., p:] = ancestor_mask(parents)
    if padded:
        # Left padding in the last row, as -inf: with P = 1 its prefix part is empty (the fused-kernel quirk).
        mask[-1, :, :, : min(3, p)] = -torch.inf
    if window is not None:
        query_pos = p + depths(parents)  # [q]
        outside = torch.arange(p)[None, :] <= query_pos[:, None] - window  # [q, P]
        mask[..., :p] = mask[..., :p].masked_fill(outside, NEG)
    return q, k, v, mask


def run(q, k, v, mask, p, backend="auto", **kwargs):
    return hybrid_tree_attention(None, q, k, v, mask, scaling=SCALE, tree_prefix_len=p, tree_attn_backend=backend,
                                 **kwargs)


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("q_len", [1, 5, 17])
@pytest.mark.parametrize("p", [0, 1, 37, 300])
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_dense(backend, heads, b, p, q_len, padded):
    q, k, v, mask = make_case(b, *heads, p, q_len, padded=padded, seed=1000 * p + 10 * q_len + b)
    out, weights = run(q, k, v, mask, p, backend, tree_prefix_masked=padded)
    assert weights is None
    assert out.shape == (b, q_len, heads[0], D) and out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(out, dense_reference(q, k, v, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("p,q_len,window", [(40, 6, 16), (100, 9, 32), (12, 5, 10)])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_window_masks_the_prefix(backend, heads, p, q_len, window):
    q, k, v, mask = make_case(2, *heads, p, q_len, window=window, seed=p + window)
    assert torch.any(mask[..., :p] < 0), "the case must hide some prefix keys"
    out, _ = run(q, k, v, mask, p, backend, sliding_window=window)
    torch.testing.assert_close(out, dense_reference(q, k, v, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_mask_is_skipped_unless_needed(backend):
    """Without padding and within the window the prefix part runs unmasked: a prefix mask is not even read."""
    q, k, v, mask = make_case(2, 8, 2, 30, 5, seed=3)
    noisy = mask.clone()
    noisy[..., :30] = NEG
    expected = dense_reference(q, k, v, mask)
    torch.testing.assert_close(run(q, k, v, noisy, 30, backend)[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(run(q, k, v, noisy, 30, backend, sliding_window=35)[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(run(q, k, v, noisy, 30, backend, sliding_window=34)[0],
                               dense_reference(q, k, v, noisy), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fill", [NEG, -torch.inf], ids=["finfo_min", "neg_inf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_prefix_rows_merge_to_the_tree_part(backend, fill):
    q, k, v, mask = make_case(2, 8, 2, 20, 4, seed=5)
    mask[1, :, :, :20] = fill
    out, _ = run(q, k, v, mask, 20, backend, tree_prefix_masked=True)
    assert not out.isnan().any()
    torch.testing.assert_close(out, dense_reference(q, k, v, mask), atol=1e-5, rtol=0)


def test_no_mask_and_boolean_mask():
    q, k, v, mask = make_case(1, 4, 2, 10, 3, seed=6)
    torch.testing.assert_close(run(q, k, v, None, 10)[0], dense_reference(q, k, v, torch.zeros_like(mask)),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(run(q, k, v, mask == 0, 10)[0], dense_reference(q, k, v, mask), atol=1e-5, rtol=0)


def test_unknown_kwargs_are_ignored():
    q, k, v, mask = make_case(1, 4, 2, 10, 3, seed=7)
    out, _ = run(q, k, v, mask, 10, position_ids=torch.arange(3)[None], use_cache=True, is_causal=True, softcap=None)
    torch.testing.assert_close(out, dense_reference(q, k, v, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
def test_without_tree_prefix_len_it_is_dense_sdpa(heads):
    q, k, v, mask = make_case(2, *heads, 20, 4, padded=True, seed=8)

    class Module:
        num_key_value_groups = heads[0] // heads[1]
        is_causal = True
        training = False

    for module in (Module(), None):  # None: the groups come from the shapes
        out, weights = hybrid_tree_attention(module, q, k, v, mask, scaling=SCALE, sliding_window=4,
                                             tree_prefix_masked=True, tree_attn_backend="torch")
        assert weights is None and out.shape == (2, 4, heads[0], D) and out.is_contiguous()
        torch.testing.assert_close(out, dense_reference(q, k, v, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_is_close_to_fp32(backend):
    q, k, v, mask = make_case(2, 8, 2, 100, 7, padded=True, seed=9)
    bf = [t.bfloat16() for t in (q, k, v, mask)]
    out, _ = run(*bf, 100, backend, tree_prefix_masked=True)
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    torch.testing.assert_close(out.float(), dense_reference(q, k, v, mask), atol=2e-2, rtol=0)


def test_auto_falls_back_to_torch_without_the_fused_op(monkeypatch):
    monkeypatch.setattr(attention, "_cpu_lse_op", lambda: None)
    assert available_backends("cpu") == ["torch"]
    q, k, v, mask = make_case(2, 8, 2, 37, 5, padded=True, seed=10)
    for backend in ("auto", "sdpa_lse"):
        out, _ = run(q, k, v, mask, 37, backend, tree_prefix_masked=True)
        torch.testing.assert_close(out, dense_reference(q, k, v, mask), atol=1e-5, rtol=0)


def test_available_backends_on_cpu():
    backends = available_backends("cpu")
    assert backends[-1] == "torch" and "flash_attn" not in backends
    assert "sdpa_lse" in backends  # this torch build ships the CPU op


def test_merge_is_exact_and_handles_empty_parts():
    g = torch.Generator().manual_seed(11)
    scores, v = torch.randn(2, 3, 4, 10, generator=g), torch.randn(2, 3, 10, 5, generator=g)
    parts = [(scores[..., s].softmax(-1) @ v[:, :, s], scores[..., s].logsumexp(-1)) for s in (slice(0, 6),
                                                                                              slice(6, 10))]
    out, lse = merge_attention_states(*parts[0], *parts[1])
    torch.testing.assert_close(out, scores.softmax(-1) @ v)
    torch.testing.assert_close(lse, scores.logsumexp(-1))

    o, lse = parts[1]
    empty_o, empty_lse = torch.full_like(o, torch.nan), torch.full_like(lse, -torch.inf)
    merged, merged_lse = merge_attention_states(empty_o, empty_lse, o, lse)
    torch.testing.assert_close(merged, o)
    torch.testing.assert_close(merged_lse, lse)
    both, both_lse = merge_attention_states(empty_o, empty_lse, empty_o, empty_lse)
    assert torch.equal(both, torch.zeros_like(o)) and torch.isneginf(both_lse).all()


def test_registered_in_attention_interface():
    register_hybrid_attention()
    register_hybrid_attention()  # idempotent
    assert AttentionInterface()[HYBRID_ATTENTION_NAME] is hybrid_tree_attention
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    assert AttentionMaskInterface()[HYBRID_ATTENTION_NAME] is sdpa_mask


def test_flash_attn_requested_without_the_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` fail even where installed
    q, k, v, mask = make_case(1, 4, 2, 6, 2, seed=12)
    for p in (6, 0):
        qq, kk, vv, mm = (q, k, v, mask) if p else (q, k[:, :, 6:], v[:, :, 6:], mask[..., 6:])
        with pytest.raises(ImportError, match=r"longspec-hf\[flash\]"):
            run(qq, kk, vv, mm, p, "flash_attn")


def test_bad_arguments_are_refused():
    q, k, v, mask = make_case(1, 4, 2, 10, 3, seed=13)
    with pytest.raises(ValueError, match="tree_attn_backend"):
        run(q, k, v, mask, 10, "cudnn")
    with pytest.raises(ValueError, match="tree_prefix_len"):
        run(q, k, v, mask, 9)


@torch.no_grad()
def test_inside_a_llama_forward(monkeypatch):
    """A tree forward through a tiny Llama gives the same logits with SDPA and with the hybrid function."""
    register_hybrid_attention()
    prefix_calls = []
    real_prefix = attention.prefix_attention_lse

    def spy(query, *args):
        prefix_calls.append(tuple(query.shape))
        return real_prefix(query, *args)

    monkeypatch.setattr(attention, "prefix_attention_lse", spy)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    cache = DynamicCache()
    model(torch.randint(128, (1, 20), generator=g), past_key_values=cache, use_cache=True)

    parents = [-1, 0, 0, 1, 2, 3]
    tree_ids = torch.randint(128, (1, 6), generator=g)
    position_ids = (20 + depths(parents))[None]
    mask = torch.zeros(1, 1, 6, 26)
    mask[..., 20:] = ancestor_mask(parents)

    logits = {}
    previous = model.config._attn_implementation
    try:
        for impl in ("sdpa", HYBRID_ATTENTION_NAME):
            model.config._attn_implementation = impl
            logits[impl] = model(tree_ids, position_ids=position_ids, attention_mask=mask,
                                 past_key_values=copy.deepcopy(cache), use_cache=True, tree_prefix_len=20).logits
    finally:
        model.config._attn_implementation = previous
    assert model.config._attn_implementation == previous
    assert prefix_calls == [(1, 4, 6, 16)] * 2  # the hybrid path ran in both layers, with P = 20 from the kwargs
    torch.testing.assert_close(logits[HYBRID_ATTENTION_NAME], logits["sdpa"], atol=1e-5, rtol=0)
