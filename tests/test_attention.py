"""Hybrid tree attention equals dense masked attention (fp32, <= 1e-5) on every CPU backend, MHA and GQA.

The CUDA prefix kernels stack the query heads of each KV head on the query axis; that layout (queries, masks, LSEs)
is checked on CPU, and so is the CUDA path's logic, with CPU stand-ins for the kernels that enforce their calling
contract. The real kernels are compared with plain attention in the tests marked for CUDA.
"""

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
    prefix_attention_lse,
    register_hybrid_attention,
    stack_mask,
    stack_query_heads,
    torch_attention_lse,
    unstack_heads,
)
from longspec_hf.compat import cache_kwarg

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
def test_the_masks_prefix_columns_decide_what_is_masked(backend):
    """A mask over the tree alone reads the prefix unmasked (the common case: no O(context) mask); prefix columns,
    which the caller builds only where they hide something, are applied whatever `sliding_window` the family passes
    (some families apply their window through the mask alone)."""
    q, k, v, mask = make_case(2, 8, 2, 30, 5, seed=3)
    noisy = mask.clone()
    noisy[..., :30] = NEG
    noisy[..., 29] = 0.0  # one visible prefix key per row
    torch.testing.assert_close(run(q, k, v, mask[..., 30:], 30, backend)[0], dense_reference(q, k, v, mask),
                               atol=1e-5, rtol=0)
    for window in (None, 34, 100):
        torch.testing.assert_close(run(q, k, v, noisy, 30, backend, sliding_window=window)[0],
                                   dense_reference(q, k, v, noisy), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="prefix keys"):
        run(q, k, v, noisy[..., 10:], 30, backend)


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


def test_inputs_that_change_nothing_are_accepted():
    q, k, v, mask = make_case(1, 4, 2, 10, 3, seed=7)
    out, _ = run(q, k, v, mask, 10, position_ids=torch.arange(3)[None], use_cache=True, is_causal=True, softcap=None,
                 s_aux=None, output_attentions=False)
    torch.testing.assert_close(out, dense_reference(q, k, v, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("extra", [{"position_bias": torch.zeros(1)}, {"indices": torch.zeros(1)},
                                   {"is_causal": False}], ids=["position_bias", "indices", "bidirectional"])
def test_an_input_it_does_not_implement_is_refused_not_dropped(extra):
    from longspec_hf.support import UnsupportedTargetError

    q, k, v, mask = make_case(1, 4, 2, 10, 3, seed=7)
    name = next(iter(extra))
    with pytest.raises(UnsupportedTargetError, match=f"passes .*{name}.* to its attention function"):
        run(q, k, v, mask, 10, **extra)


def dense_reference_with(q, k, v, mask, softcap=None, sinks=None, scale=SCALE):
    """The families' own eager rule: scaled scores, soft-capped (Gemma 2), masked, a sink logit per head joining the
    softmax and dropped after it (gpt-oss)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    scores = q.float() @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + mask.float()
    if sinks is not None:
        sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    return (probs @ v).transpose(1, 2)


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("p", [0, 1, 37])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_capping_and_sinks_match_the_eager_rule(backend, heads, p, padded):
    q, k, v, mask = make_case(2, *heads, p, 5, padded=padded, seed=p + 11)
    q = q * 3  # scores well beyond the cap, so capping bites
    sinks = torch.randn(heads[0], generator=torch.Generator().manual_seed(p))
    for softcap, s_aux in ((2.0, None), (None, sinks), (2.0, sinks)):
        out, _ = run(q, k, v, mask, p, backend, tree_prefix_masked=padded, softcap=softcap, s_aux=s_aux)
        expected = dense_reference_with(q, k, v, mask, softcap, s_aux)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        assert (out - dense_reference(q, k, v, mask)).abs().max() > 1e-3, "the case must be changed by the input"


def test_soft_capping_and_sinks_outside_verification_are_exact_too():
    q, k, v, mask = make_case(1, 4, 2, 10, 3, seed=12)
    sinks = torch.randn(4)
    out, _ = hybrid_tree_attention(None, q * 3, k, v, mask, scaling=SCALE, softcap=2.0, s_aux=sinks)
    torch.testing.assert_close(out, dense_reference_with(q * 3, k, v, mask, 2.0, sinks), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_narrower_than_keys(backend):
    """Multi-head latent attention (DeepSeek-style) has value heads narrower than query/key heads."""
    q, k, v, mask = make_case(2, 8, 2, 30, 5, padded=True, seed=13)
    v = v[..., :8].contiguous()
    out, _ = run(q, k, v, mask, 30, backend, tree_prefix_masked=True)
    assert out.shape == (2, 5, 8, 8)
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
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    assert AttentionMaskInterface()[HYBRID_ATTENTION_NAME] is eager_mask


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
    model(torch.randint(128, (1, 20), generator=g), use_cache=True, **{cache_kwarg(model): cache})

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
            logits[impl] = model(tree_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                                 tree_prefix_len=20, **{cache_kwarg(model): copy.deepcopy(cache)}).logits
    finally:
        model.config._attn_implementation = previous
    assert model.config._attn_implementation == previous
    assert prefix_calls == [(1, 4, 6, 16)] * 2  # the hybrid path ran in both layers, with P = 20 from the kwargs
    torch.testing.assert_close(logits[HYBRID_ATTENTION_NAME], logits["sdpa"], atol=1e-5, rtol=0)


# --------------------------------------------------------------------- query heads stacked per KV head (CUDA layout)

HALF = (torch.float16, torch.bfloat16)
MASK_KINDS = [None, "shared", "batch1", "per_head", "per_head_rows"]


def gqa_reference(query, key, value, mask, scale=SCALE):
    """Independent reference: KV heads repeated, fp32 softmax; `(out [B, H, q, D], lse [B, H, q])`."""
    g = query.shape[1] // key.shape[1]
    k, v = key.float().repeat_interleave(g, 1), value.float().repeat_interleave(g, 1)
    scores = query.float() @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + mask.float()
    return scores.softmax(-1) @ v, scores.logsumexp(-1)


def cache_views(b, hkv, s, d, generator, dtype=torch.float32, device="cpu"):
    """K/V as the filled part of preallocated caches `[B, Hkv, capacity, D]`: strided views, not contiguous."""
    capacity = s + 29
    k, v = (torch.randn(b, hkv, capacity, d, generator=generator).to(device, dtype)[:, :, :s] for _ in range(2))
    assert not k.is_contiguous() and k.stride(-1) == 1
    return k, v


def hf_query(b, h, q_len, d, generator, dtype=torch.float32, device="cpu"):
    """A query laid out as attention layers make it: `[B, q, H, D]` in memory, seen as `[B, H, q, D]`."""
    return torch.randn(b, q_len, h, d, generator=generator).to(device, dtype).transpose(1, 2)


def prefix_mask(kind, b, h, q_len, s, generator):
    """Additive prefix masks in the shapes callers pass; every row keeps its last key visible.

    "shared" `[B, 1, q, S]` (padding / window; the last batch row left-padded), "batch1" `[1, 1, q, S]`,
    "per_head" `[B, H, 1, S]` (SpecPV's per-KV-head validity), "per_head_rows" `[B, H, q, S]`.
    """
    if kind is None:
        return None
    shape = {"shared": (b, 1, q_len, s), "batch1": (1, 1, q_len, s), "per_head": (b, h, 1, s),
             "per_head_rows": (b, h, q_len, s)}[kind]
    mask = torch.zeros(shape).masked_fill_(torch.rand(shape, generator=generator) < 0.3, -torch.inf)
    if kind == "shared":
        mask[-1, ..., : s // 3] = -torch.inf
    mask[..., -1] = 0.0
    return mask


@pytest.mark.parametrize("q_len", [1, 4, 69])
@pytest.mark.parametrize("g", [1, 4])
def test_stack_query_heads_layout(g, q_len):
    """Head kv * g + j, query i <-> KV head kv, row j * q + i; unstacking inverts it for outputs and LSEs."""
    b, hkv = 2, 3
    query = torch.randn(b, hkv * g, q_len, D)
    stacked = stack_query_heads(query, hkv)
    assert stacked.shape == (b, hkv, g * q_len, D)
    lse = torch.randn(b, hkv, g * q_len)
    unstacked_lse = unstack_heads(lse, hkv * g)
    for kv in range(hkv):
        for j in range(g):
            rows = slice(j * q_len, (j + 1) * q_len)
            assert torch.equal(stacked[:, kv, rows], query[:, kv * g + j])
            assert torch.equal(unstacked_lse[:, kv * g + j], lse[:, kv, rows])
    assert torch.equal(unstack_heads(stacked, hkv * g), query)
    transposed = query.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [B, q, H, D] in memory
    assert torch.equal(stack_query_heads(transposed, hkv), stacked)
    with pytest.raises(ValueError, match="multiple"):
        stack_query_heads(torch.randn(1, 6, 2, D), 4)


@pytest.mark.parametrize("s", [5, 16, 37])
@pytest.mark.parametrize("kind", MASK_KINDS[1:])
@pytest.mark.parametrize("g", [1, 4])
def test_stack_mask_layout(g, kind, s):
    """Rows match the stacked queries, heads stay broadcast where the mask is shared, rows start 16-aligned."""
    b, hkv, q_len = 2, 2, 3
    h = hkv * g
    mask = prefix_mask(kind, b, h, q_len, s, torch.Generator().manual_seed(s))
    stacked = stack_mask(mask, h, hkv, q_len, torch.bfloat16)
    assert stacked.dtype == torch.bfloat16
    assert stacked.shape == (mask.shape[0], 1 if mask.shape[1] == 1 else hkv, g * q_len, s)
    assert stacked.stride(-1) == 1 and all(stride % 16 == 0 for stride in stacked.stride()[:-1])
    assert stacked.data_ptr() % 16 == 0
    full = unstack_heads(stacked.expand(b, hkv, g * q_len, s), h)  # [B, H, q, S]
    assert torch.equal(full, mask.to(torch.bfloat16).expand(b, h, q_len, s))
    with pytest.raises(ValueError, match="broadcast"):
        stack_mask(torch.zeros(1, 3, q_len, s), h * 2, hkv, q_len, torch.float32)


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("q_len", [1, 4, 69])
@pytest.mark.parametrize("g", [1, 4])
def test_stacked_heads_as_mha_equal_gqa(g, q_len, kind):
    """A fused op run as plain MHA over the KV heads, on stacked queries and masks and strided KV views, is GQA."""
    b, hkv, s = 2, 2, 53
    h = hkv * g
    gen = torch.Generator().manual_seed(100 * g + q_len)
    query = hf_query(b, h, q_len, D, gen)
    key, value = cache_views(b, hkv, s, D, gen)
    mask = prefix_mask(kind, b, h, q_len, s, gen)
    bias = None if mask is None else stack_mask(mask, h, hkv, q_len, torch.float32).expand(b, hkv, g * q_len, s)
    cpu_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = cpu_op(stack_query_heads(query, hkv), key, value, 0.0, False, attn_mask=bias, scale=SCALE)[:2]
    out, lse = unstack_heads(out, h), unstack_heads(lse, h)
    expected_out, expected_lse = gqa_reference(query, key, value, mask)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=0)
    plain_out, plain_lse = torch_attention_lse(query, key, value, mask, SCALE)
    torch.testing.assert_close(plain_out, expected_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain_lse, expected_lse, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("q_len", [1, 4])
def test_cpu_lse_op_runs_once_per_kv_head(monkeypatch, q_len, kind):
    """The CPU path hands the fused op the KV heads as they are (stacked queries), so it reads the prefix once per KV
    head rather than once per query head, and still returns GQA's result in the query heads' layout."""
    b, hkv, g, s = 2, 2, 3, 41
    h = hkv * g
    gen = torch.Generator().manual_seed(7 + q_len)
    query = hf_query(b, h, q_len, D, gen)
    key, value = cache_views(b, hkv, s, D, gen)
    mask = prefix_mask(kind, b, h, q_len, s, gen)
    op, calls = attention._cpu_lse_op(), []

    def recording(q, *args, **kwargs):
        calls.append(q.shape)
        return op(q, *args, **kwargs)

    monkeypatch.setattr(attention, "_cpu_lse_op", lambda: recording)
    out, lse = attention.sdpa_lse_attention(query, key, value, mask, SCALE)
    assert calls == [(b, hkv, g * q_len, D)]
    expected_out, expected_lse = gqa_reference(query, key, value, mask)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", [None, "shared", "per_head"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_attention_reads_strided_cache_views(backend, kind):
    gen = torch.Generator().manual_seed(21)
    query = hf_query(2, 8, 5, D, gen)
    key, value = cache_views(2, 2, 41, D, gen)
    mask = prefix_mask(kind, 2, 8, 5, 41, gen)
    out, lse = prefix_attention_lse(query, key, value, mask, SCALE, backend)
    expected_out, expected_lse = gqa_reference(query, key, value, mask)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=0)


class FakeCudaKernels:
    """CPU stand-ins for torch's CUDA flash / efficient ops: same calls and returns, quirks included, and they check
    the contract the CUDA path must keep: no GQA left (query heads stacked), the caller's K/V views handed over as they
    are (no copy), a bias of the full `[B, Hkv, M, S]` shape in the query's dtype with aligned rows."""

    def __init__(self, key, value, flash_fails=False, efficient_fails=False):
        self.key, self.value = key, value
        self.flash_fails, self.efficient_fails = flash_fails, efficient_fails
        self.calls = []

    def _check(self, q, k, v):
        assert k is self.key and v is self.value
        assert q.shape[1] == k.shape[1] and q.shape[0] == k.shape[0] and q.dtype == k.dtype

    @staticmethod
    def _attention(q, k, v, bias, scale):
        scores = q.float() @ k.float().transpose(-1, -2) * scale
        if bias is not None:
            scores = scores + bias.float()
        return scores.softmax(-1) @ v.float(), scores.logsumexp(-1)  # NaN / -inf on fully masked rows

    def flash(self, q, k, v, dropout_p, is_causal, return_debug_mask, *, scale):
        self.calls.append("flash")
        assert q.dtype in HALF and (dropout_p, is_causal, return_debug_mask) == (0.0, False, False)
        self._check(q, k, v)
        if self.flash_fails:
            raise RuntimeError("FlashAttention forward only supports head dimension at most 256")
        out, lse = self._attention(q, k, v, None, scale)
        return out.to(q.dtype), lse, None, None, 0, 0, None, None, None

    def efficient(self, q, k, v, bias, compute_log_sumexp, dropout_p, is_causal, *, scale):
        self.calls.append("efficient")
        assert compute_log_sumexp and dropout_p == 0.0 and not is_causal
        self._check(q, k, v)
        if bias is not None:
            assert bias.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) and bias.dtype == q.dtype
            assert bias.stride(-1) == 1 and all(stride % 16 == 0 for stride in bias.stride()[:-1])
        if self.efficient_fails:
            raise RuntimeError("key is not correctly aligned (strideM)")
        out, lse = self._attention(q, k, v, bias, scale)
        lse = lse.masked_fill(lse.isneginf(), 0.0)  # the kernel's report for a row with no visible key
        rounded = -(-q.shape[2] // 32) * 32  # lse comes padded to a multiple of 32 rows
        lse = torch.cat([lse, lse.new_full((*lse.shape[:2], rounded - q.shape[2]), 123.0)], dim=-1)
        return out.to(q.dtype), lse, None, None


def install_fakes(monkeypatch, key, value, **fails):
    fakes = FakeCudaKernels(key, value, **fails)
    monkeypatch.setattr(attention, "_cuda_flash_op", lambda: fakes.flash)
    monkeypatch.setattr(attention, "_cuda_efficient_op", lambda: fakes.efficient)
    return fakes


@pytest.mark.parametrize("kind", [None, "shared", "batch1", "per_head"])
@pytest.mark.parametrize("q_len", [1, 4, 69])
@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_path_logic_with_stand_in_kernels(monkeypatch, dtype, g, q_len, kind):
    """Flash op for fp16/bf16 without a mask, efficient op otherwise; both equal plain attention."""
    b, hkv, s = 2, 2, 45
    h = hkv * g
    gen = torch.Generator().manual_seed(7 * g + q_len)
    query = hf_query(b, h, q_len, D, gen, dtype)
    key, value = cache_views(b, hkv, s, D, gen, dtype)
    mask = prefix_mask(kind, b, h, q_len, s, gen)
    fakes = install_fakes(monkeypatch, key, value)
    out, lse = attention._cuda_sdpa_lse(query, key, value, mask, SCALE)
    assert fakes.calls == ["flash" if mask is None and dtype in HALF else "efficient"]
    assert out.dtype == lse.dtype == torch.float32 and out.shape == query.shape and lse.shape == (b, h, q_len)
    expected_out, expected_lse = torch_attention_lse(query, key, value, mask, SCALE)
    torch.testing.assert_close(out, expected_out, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,fill", [(torch.float32, -torch.inf), (torch.bfloat16, -torch.inf),
                                        (torch.float16, NEG)], ids=["fp32", "bf16", "fp16_overflow"])
def test_cuda_path_reports_empty_rows_as_neg_inf(monkeypatch, dtype, fill):
    """A row with no visible prefix key gets lse = -inf, also when a finite fill only overflows in the query dtype."""
    gen = torch.Generator().manual_seed(8)
    query = hf_query(2, 8, 3, D, gen, dtype)
    key, value = cache_views(2, 2, 20, D, gen, dtype)
    mask = torch.zeros(2, 1, 3, 20)
    mask[1, :, 1] = fill
    install_fakes(monkeypatch, key, value)
    out, lse = attention._cuda_sdpa_lse(query, key, value, mask, SCALE)
    assert torch.isneginf(lse[1, :, 1]).all() and torch.isfinite(lse[0]).all() and torch.isfinite(lse[1, :, 0]).all()
    tree_out, tree_lse = torch.randn(2, 8, 3, D, generator=gen), torch.randn(2, 8, 3, generator=gen)
    merged, _ = merge_attention_states(out, lse, tree_out, tree_lse)
    assert not merged.isnan().any()
    torch.testing.assert_close(merged[1, :, 1], tree_out[1, :, 1])
    expected, _ = merge_attention_states(*torch_attention_lse(query, key, value, mask.to(dtype), SCALE),
                                         tree_out, tree_lse)
    torch.testing.assert_close(merged, expected, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)


def test_cuda_path_falls_through_when_kernels_refuse(monkeypatch):
    gen = torch.Generator().manual_seed(9)
    query = hf_query(1, 4, 2, D, gen, torch.bfloat16)
    key, value = cache_views(1, 2, 10, D, gen, torch.bfloat16)
    fakes = install_fakes(monkeypatch, key, value, flash_fails=True)
    out, lse = attention._cuda_sdpa_lse(query, key, value, None, SCALE)
    assert fakes.calls == ["flash", "efficient"]
    torch.testing.assert_close(lse, torch_attention_lse(query, key, value, None, SCALE)[1], atol=1e-5, rtol=0)
    fakes = install_fakes(monkeypatch, key, value, flash_fails=True, efficient_fails=True)
    assert attention._cuda_sdpa_lse(query, key, value, None, SCALE) is None
    assert fakes.calls == ["flash", "efficient"]
    fakes = install_fakes(monkeypatch, key, value)
    assert attention._cuda_sdpa_lse(query, key[:, :, :0], value[:, :, :0], None, SCALE) is None
    assert fakes.calls == []  # zero keys never reach a kernel


# ------------------------------------------------------------------------------------ the real kernels (CUDA only)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
OUT_ATOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}
LSE_ATOL = 2e-3
CUDA_D = 128


def skip_unsupported(dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")


def cuda_case(b, hkv, g, q_len, s, dtype, kind, seed, d=CUDA_D):
    """Query `[B, H, q, D]` (`[B, q, H, D]` in memory), K/V strided views of larger caches, a prefix mask; on CUDA."""
    gen = torch.Generator().manual_seed(seed)
    query = hf_query(b, hkv * g, q_len, d, gen, dtype, "cuda")
    key, value = cache_views(b, hkv, s, d, gen, dtype, "cuda")
    mask = prefix_mask(kind, b, hkv * g, q_len, s, gen)
    return query, key, value, None if mask is None else mask.to("cuda", dtype)


def assert_close_to_plain(result, query, key, value, mask, dtype, scale=CUDA_D ** -0.5):
    assert result is not None, "the kernel refused inputs it should serve"
    out, lse = result
    expected_out, expected_lse = torch_attention_lse(query, key, value, mask, scale)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out, expected_out, atol=OUT_ATOL[dtype], rtol=0)
    torch.testing.assert_close(lse, expected_lse, atol=LSE_ATOL, rtol=0)


@needs_cuda
@pytest.mark.parametrize("q_len", [1, 4, 69])
@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_cuda_flash_op_stacked(dtype, g, q_len):
    skip_unsupported(dtype)
    query, key, value, _ = cuda_case(2, 2, g, q_len, 1000, dtype, None, seed=g * 100 + q_len)
    result = attention._cuda_flash_lse(query, key, value, CUDA_D ** -0.5)
    assert_close_to_plain(result, query, key, value, None, dtype)


@needs_cuda
@pytest.mark.parametrize("kind", [None, "shared", "batch1", "per_head"])
@pytest.mark.parametrize("q_len", [1, 4, 69])
@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=["fp16", "bf16", "fp32"])
def test_cuda_efficient_op_stacked(dtype, g, q_len, kind):
    skip_unsupported(dtype)
    query, key, value, mask = cuda_case(2, 2, g, q_len, 1003, dtype, kind, seed=g * 100 + q_len)
    result = attention._cuda_efficient_lse(query, key, value, mask, CUDA_D ** -0.5)
    assert_close_to_plain(result, query, key, value, mask, dtype)


@needs_cuda
@pytest.mark.parametrize("kind", [None, "shared", "per_head"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=["fp16", "bf16", "fp32"])
def test_cuda_sdpa_lse_never_falls_back_to_plain_attention(monkeypatch, dtype, kind):
    """Through `prefix_attention_lse`, every dtype and mask is served by a fused kernel, GQA and strided KV included."""
    skip_unsupported(dtype)
    query, key, value, mask = cuda_case(2, 2, 4, 5, 777, dtype, kind, seed=31)
    expected = torch_attention_lse(query, key, value, mask, CUDA_D ** -0.5)

    def refuse(*args):
        raise AssertionError("fell through to plain attention")

    monkeypatch.setattr(attention, "torch_attention_lse", refuse)
    out, lse = prefix_attention_lse(query, key, value, mask, CUDA_D ** -0.5, "sdpa_lse")
    torch.testing.assert_close(out, expected[0], atol=OUT_ATOL[dtype], rtol=0)
    torch.testing.assert_close(lse, expected[1], atol=LSE_ATOL, rtol=0)


@needs_cuda
@pytest.mark.parametrize("dtype,fill", [(torch.float32, -torch.inf), (torch.bfloat16, -torch.inf),
                                        (torch.float16, NEG)], ids=["fp32", "bf16", "fp16_overflow"])
def test_cuda_empty_prefix_rows_have_neg_inf_lse(dtype, fill):
    skip_unsupported(dtype)
    query, key, value, _ = cuda_case(2, 2, 4, 3, 100, dtype, None, seed=41)
    mask = torch.zeros(2, 1, 3, 100, device="cuda")
    mask[1, :, 1] = fill
    result = attention._cuda_efficient_lse(query, key, value, mask.to(dtype) if fill == -torch.inf else mask,
                                           CUDA_D ** -0.5)
    assert result is not None
    out, lse = result
    assert torch.isneginf(lse[1, :, 1]).all()
    keep = torch.ones(2, 8, 3, dtype=torch.bool, device="cuda")
    keep[1, :, 1] = False
    expected_out, expected_lse = torch_attention_lse(query, key, value, mask, CUDA_D ** -0.5)
    torch.testing.assert_close(out[keep], expected_out[keep], atol=OUT_ATOL[dtype], rtol=0)
    torch.testing.assert_close(lse[keep], expected_lse[keep], atol=LSE_ATOL, rtol=0)


@needs_cuda
@pytest.mark.parametrize("masked", [False, True], ids=["flash", "efficient"])
def test_cuda_fast_paths_do_not_copy_the_kv(masked):
    """Peak extra memory stays far below one copy of the keys (a repeat or a `.contiguous()` would show)."""
    query, key, value, mask = cuda_case(1, 2, 4, 4, 32768, torch.float16, "shared" if masked else None, seed=51)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = attention._cuda_sdpa_lse(query, key, value, mask, CUDA_D ** -0.5)
    torch.cuda.synchronize()
    assert result is not None
    assert torch.cuda.max_memory_allocated() - base < key.numel() * key.element_size() // 2


@needs_cuda
@pytest.mark.parametrize("d", [12, 320])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=["fp16", "bf16", "fp32"])
def test_cuda_head_dims_the_kernels_refuse_fall_through(dtype, d):
    skip_unsupported(dtype)
    query, key, value, mask = cuda_case(1, 2, 2, 3, 64, dtype, "shared", seed=61, d=d)
    for m in (None, mask):
        out, lse = prefix_attention_lse(query, key, value, m, d ** -0.5, "auto")
        expected_out, expected_lse = torch_attention_lse(query, key, value, m, d ** -0.5)
        torch.testing.assert_close(out, expected_out, atol=OUT_ATOL[dtype], rtol=0)
        torch.testing.assert_close(lse, expected_lse, atol=LSE_ATOL, rtol=0)


@needs_cuda
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("backend", sorted(set(available_backends("cuda")) | {"auto"}))
def test_cuda_hybrid_matches_dense(backend, dtype, padded):
    """The whole verification attention on CUDA, K/V being views of a larger cache, equals dense attention."""
    skip_unsupported(dtype)
    p, q_len = 300, 7
    q, k, v, mask = make_case(2, 8, 2, p, q_len, padded=padded, seed=71)
    k_cache, v_cache = (torch.zeros(2, 2, p + q_len + 50, D, dtype=dtype, device="cuda") for _ in range(2))
    k_cache[:, :, : p + q_len], v_cache[:, :, : p + q_len] = k, v
    cuda = [t.to("cuda", dtype) for t in (q, mask)]
    out, _ = hybrid_tree_attention(None, cuda[0], k_cache[:, :, : p + q_len], v_cache[:, :, : p + q_len], cuda[1],
                                   scaling=SCALE, tree_prefix_len=p, tree_prefix_masked=padded,
                                   tree_attn_backend=backend)
    assert out.dtype == dtype and out.shape == (2, q_len, 8, D) and not out.isnan().any()
    rounded = [t.to(dtype).float() for t in (q, k, v, mask)]  # the reference sees the same rounded inputs
    torch.testing.assert_close(out.float().cpu(), dense_reference(*rounded), atol=OUT_ATOL[dtype], rtol=0)


@needs_cuda
def test_cuda_flash_attn_package_errors_fall_through(monkeypatch):
    """A flash-attn call that raises (unsupported head dim, GPU) falls through to torch's kernels, installed or not."""
    def broken(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    monkeypatch.setattr(attention, "_flash_attn_func", lambda required=False: broken)
    query, key, value, _ = cuda_case(1, 2, 4, 3, 200, torch.float16, None, seed=81)
    for backend in ("auto", "flash_attn"):
        result = prefix_attention_lse(query, key, value, None, CUDA_D ** -0.5, backend)
        assert_close_to_plain(result, query, key, value, None, torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sliding_layer_reads_only_the_keys_its_window_can_see(backend):
    """With `tree_window_keys=M` the prefix part reads the last M committed keys only, under a mask over those alone:
    keys before them are never touched (NaN there would poison the output), so the cost is O(window)."""
    p, q_len, window = 200, 5, 24
    q, k, v, mask = make_case(2, 8, 2, p, q_len, window=window, seed=21)
    reach = window - 1
    expected = dense_reference(q, k, v, mask)
    k, v = k.clone(), v.clone()
    k[:, :, : p - reach] = torch.nan
    v[:, :, : p - reach] = torch.nan
    short = torch.cat([mask[..., p - reach : p], mask[..., p:]], dim=-1)  # [B, 1, q, M + q]
    out, _ = run(q, k, v, short, p, backend, sliding_window=window, tree_window_keys=reach)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_the_backend_is_resolved_once_per_call_before_the_rounds(monkeypatch):
    """"auto" becomes a concrete backend eagerly, at the start of generate(): the verification forwards (compiled or
    not) look nothing up; a bad name fails there, naming the choices."""
    from conftest import OracleDrafter, plain_greedy, random_prompt, tiny_target

    assert attention.resolve_backend("auto", torch.device("cpu"), torch.float32, 4, 2, 16) == "sdpa_lse"
    assert attention.resolve_backend("torch", torch.device("cpu"), torch.float32, 4, 2, 16) == "torch"
    with pytest.raises(ValueError, match="choose one of"):
        attention.resolve_backend("fast", torch.device("cpu"), torch.float32, 4, 2, 16)
    seen, resolved = [], []
    real_prefix, real_resolve = attention.prefix_attention_lse, attention.resolve_backend
    monkeypatch.setattr(attention, "prefix_attention_lse", lambda *a, **k: seen.append(a[5]) or real_prefix(*a, **k))
    monkeypatch.setattr("longspec_hf.generation.resolve_backend",
                        lambda *a: resolved.append(a[0]) or real_resolve(*a))
    target = tiny_target("llama")
    ids = random_prompt(30, seed=2)
    expected = plain_greedy(target, ids, max_new_tokens=12)
    oracle = OracleDrafter(target, expected, [1, 1])
    out = target.generate(ids, assistant_model=oracle, do_sample=False, max_new_tokens=12)
    assert torch.equal(out, expected)
    assert resolved == ["auto"] and seen and set(seen) == {"sdpa_lse"}
