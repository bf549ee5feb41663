"""Hybrid tree attention equals dense masked attention (fp32, <= 1e-5), on every CPU backend, with GQA."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_prompt, tiny_target
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from longspec_hf.attention import (
    HYBRID_ATTENTION_NAME,
    available_backends,
    hybrid_tree_attention,
    merge_attention_states,
    register_hybrid_attention,
)

NEG = torch.finfo(torch.float32).min


def dense_reference(q, k, v, mask, scale):
    """Independent reference: expand KV heads, softmax over all keys with the full additive mask."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = q @ k.transpose(-1, -2) * scale + mask
    return (scores.softmax(-1) @ v).transpose(1, 2)  # [B, q, H, D]


def random_tree_mask(q_len, generator):
    """Additive `[q, q]` mask of a random tree: node i sees itself and its ancestors."""
    parents = [-1] + [int(torch.randint(i, (1,), generator=generator)) for i in range(1, q_len)]
    sees = torch.eye(q_len, dtype=torch.bool)
    for i in range(1, q_len):
        sees[i] |= sees[parents[i]]
    return torch.zeros(q_len, q_len).masked_fill(~sees, NEG)


def make_case(b, h, hkv, p, q_len, padded=False, window=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = 16
    q = torch.randn(b, h, q_len, d, generator=g)
    k = torch.randn(b, hkv, p + q_len, d, generator=g)
    v = torch.randn(b, hkv, p + q_len, d, generator=g)
    mask = torch.zeros(b, 1, q_len, p + q_len)
    mask[..., p:] = random_tree_mask(q_len, g)
    if padded and p > 3:
        mask[-1, :, :, :3] = NEG  # left padding in the last row
    if window is not None:
        depth_pos = p + torch.arange(q_len)  # a conservative stand-in for node positions
        outside = torch.arange(p)[None, :] <= depth_pos[:, None] - window
        mask[..., :p] = mask[..., :p].masked_fill(outside, NEG)
    return q, k, v, mask


BACKENDS = sorted(set(available_backends("cpu")) | {"auto"})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("p", [0, 1, 37, 300])
@pytest.mark.parametrize("q_len", [1, 5, 17])
def test_matches_dense(backend, heads, b, p, q_len):
    q, k, v, mask = make_case(b, *heads, p, q_len, seed=p * 31 + q_len)
    out, weights = hybrid_tree_attention(
        None, q, k, v, mask, scaling=0.25, tree_prefix_len=p, tree_attn_backend=backend
    )
    assert weights is None and out.shape == (b, q_len, heads[0], 16) and out.is_contiguous()
    torch.testing.assert_close(out, dense_reference(q, k, v, mask, 0.25), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_and_sliding_window_masks_are_honoured(backend):
    q, k, v, mask = make_case(2, 8, 2, 64, 9, padded=True)
    out, _ = hybrid_tree_attention(None, q, k, v, mask, scaling=0.25, tree_prefix_len=64, tree_prefix_masked=True,
                                   tree_attn_backend=backend)
    torch.testing.assert_close(out, dense_reference(q, k, v, mask, 0.25), atol=1e-5, rtol=0)
    q, k, v, mask = make_case(1, 4, 2, 64, 9, window=20)
    out, _ = hybrid_tree_attention(None, q, k, v, mask, scaling=0.25, sliding_window=20, tree_prefix_len=64,
                                   tree_attn_backend=backend)
    torch.testing.assert_close(out, dense_reference(q, k, v, mask, 0.25), atol=1e-5, rtol=0)


def test_without_tree_prefix_len_it_is_plain_sdpa():
    q, k, v, mask = make_case(1, 8, 2, 20, 4)

    class Module:
        num_key_value_groups = 4
        is_causal = True
        training = False

    out, _ = hybrid_tree_attention(Module(), q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(out, dense_reference(q, k, v, mask, 0.25), atol=1e-5, rtol=0)


def test_bf16_is_close_to_fp32():
    q, k, v, mask = make_case(1, 8, 2, 100, 7)
    out, _ = hybrid_tree_attention(None, q.bfloat16(), k.bfloat16(), v.bfloat16(), mask.bfloat16(), scaling=0.25,
                                   tree_prefix_len=100)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dense_reference(q, k, v, mask, 0.25), atol=3e-2, rtol=0)


def test_merge_handles_an_empty_part():
    o = torch.randn(1, 2, 3, 4)
    lse = torch.randn(1, 2, 3)
    merged, merged_lse = merge_attention_states(torch.zeros_like(o), torch.full_like(lse, -torch.inf), o, lse)
    torch.testing.assert_close(merged, o)
    torch.testing.assert_close(merged_lse, lse)


def test_registered_in_attention_interface():
    register_hybrid_attention()
    assert ALL_ATTENTION_FUNCTIONS[HYBRID_ATTENTION_NAME] is hybrid_tree_attention


def test_unknown_backend_is_refused():
    q, k, v, mask = make_case(1, 4, 2, 10, 3)
    with pytest.raises(ValueError, match="tree_attn_backend"):
        hybrid_tree_attention(None, q, k, v, mask, tree_prefix_len=10, tree_attn_backend="cudnn")


@torch.no_grad()
def test_inside_a_real_model_forward():
    """A tree forward through a Llama model gives the same logits with SDPA and with the hybrid function."""
    register_hybrid_attention()
    model = tiny_target("llama")
    cache = DynamicCache()
    model(random_prompt(20), past_key_values=cache, use_cache=True)
    tree_ids = random_prompt(6, seed=9)
    position_ids = (20 + torch.tensor([0, 1, 1, 2, 2, 3]))[None]
    mask = torch.zeros(1, 1, 6, 26)
    mask[0, 0, :, 20:] = torch.tensor(
        [[0, NEG, NEG, NEG, NEG, NEG], [0, 0, NEG, NEG, NEG, NEG], [0, NEG, 0, NEG, NEG, NEG],
         [0, 0, NEG, 0, NEG, NEG], [0, NEG, 0, NEG, 0, NEG], [0, 0, NEG, 0, NEG, 0]]
    )
    logits = {}
    for impl in ("sdpa", HYBRID_ATTENTION_NAME):
        previous = model.config._attn_implementation
        model.config._attn_implementation = impl
        try:
            out = model(tree_ids, position_ids=position_ids, attention_mask=mask,
                        past_key_values=copy.deepcopy(cache), use_cache=True, tree_prefix_len=20)
        finally:
            model.config._attn_implementation = previous
        logits[impl] = out.logits
    torch.testing.assert_close(logits["sdpa"], logits[HYBRID_ATTENTION_NAME], atol=1e-5, rtol=0)
