"""The draft's window rule: what its self-attention sees of the committed tokens and of its tree.

The official rule is checked against an independent reference (plain torch, float64, dense masks written from the
rule's definition in absolute positions) at contexts longer than the 512-token window, where the rules differ; the
project's rule is checked against the training objective's own mask (training and inference must agree).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import random_prompt, tiny_target
from safetensors.torch import save_file
from transformers import DynamicCache

from longspec_hf import LongSpecDraftConfig, LongSpecDraftModel
from longspec_hf.compat import cache_kwarg
from longspec_hf.training import cross_attention_allowed, self_attention_allowed
from longspec_hf.tree import tree_attention_bias
from longspec_hf.verify import TargetState

CHAIN, TREE = (1, 1, 1, 1), (3, 4, 2)


def perturbed(draft: LongSpecDraftModel, seed: int = 1) -> LongSpecDraftModel:
    """Non-trivial weights (biases and norms too), so that attending to one key more or less shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return draft


def official_draft(tmp_path: Path, family: str = "llama") -> LongSpecDraftModel:
    """A synthetic official checkpoint (target-style config, bare tensors), loaded through the conversion."""
    target = tiny_target(family)
    source = perturbed(LongSpecDraftModel.from_target(target))
    target.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    draft = LongSpecDraftModel.from_pretrained(tmp_path)
    draft.bind(target)
    return draft


def target_state(target, ids: torch.LongTensor, mask: torch.Tensor | None = None) -> TargetState:
    """The target's state after reading the committed tokens `ids [B, n]` (left-padded where `mask` is 0)."""
    if mask is None:
        positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    else:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    with torch.no_grad():
        target(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
               **{cache_kwarg(target): cache})
    return TargetState(cache=cache, valid=None if mask is None else mask.bool(), slot_positions=positions,
                       next_positions=positions[:, -1] + 1)


def draft_round(draft, ids, roots, tree_shape, mask=None):
    """One drafting round after the committed `ids`: the tree and the logits of every level the draft ran."""
    state = target_state(draft.target, ids, mask)
    draft.generation_config.tree_shape = list(tree_shape)
    levels = []
    hook = draft.register_forward_hook(lambda module, args, out: levels.append(out.detach()))
    try:
        with torch.no_grad():
            tree = draft.draft(draft.start(ids, mask, state), roots, state.next_positions, state, tuple(tree_shape))
    finally:
        hook.remove()
    return tree, levels, state


def paths(tree, row: int = 0):
    """Per node: the tree nodes from the root to it."""
    parents = tree.parents[row].tolist()
    out = []
    for node in range(len(parents)):
        path = [node]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        out.append(path[::-1])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the reference: the draft layer in plain float64 torch, one query at a time, with a dense mask over its path


def rms_norm(x, weight, eps):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotary(x, positions, theta):
    """Llama-style RoPE of `x [H, L, D]` at integer `positions [L]` (halves rotated, default scaling)."""
    d = x.shape[-1]
    angles = positions[:, None].double() * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [L, D/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def attend(q, k, v, allowed):
    """One query `q [H, D]` over `k, v [Hkv, L, D]` where `allowed [L]`; query head h reads KV head h // (H / Hkv)."""
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # [H, L, D]
    scores = (k @ q[:, :, None])[..., 0] / math.sqrt(q.shape[-1])  # [H, L]
    weights = scores.masked_fill(~allowed, -math.inf).softmax(-1)
    return (weights[..., None] * v).sum(1).flatten()  # [H * D]


def reference_logits(draft, tokens, positions, allowed, target_key, target_value):
    """Logits `[V]` of the last of `tokens [L]` (at `positions [L]`) seeing the keys where `allowed [L]`, and all of
    `target_key/target_value [Hkv, S, D]` (the target's last layer, post-RoPE)."""
    w = {k: v.double() for k, v in draft.state_dict().items()}
    cfg = draft.config
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    theta = cfg.rope_parameters["rope_theta"]

    def proj(x, name):
        out = x @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    h = draft.target.get_input_embeddings().weight.double()[tokens]  # [L, hidden]
    x = rms_norm(h, w["input_layernorm.weight"], cfg.rms_norm_eps)
    q = rotary(proj(x[-1:], "self_attn.q_proj").view(1, heads, d).transpose(0, 1), positions[-1:], theta)[:, 0]
    k = rotary(proj(x, "self_attn.k_proj").view(-1, kv_heads, d).transpose(0, 1), positions, theta)
    v = proj(x, "self_attn.v_proj").view(-1, kv_heads, d).transpose(0, 1)
    hidden = h[-1] + proj(attend(q, k, v, allowed), "self_attn.o_proj")

    x = rms_norm(hidden, w["post_self_attention_layernorm.weight"], cfg.rms_norm_eps)
    q = rotary(proj(x[None], "cross_attn.q_proj").view(1, heads, d).transpose(0, 1), positions[-1:], theta)[:, 0]
    every = torch.ones(target_key.shape[1], dtype=torch.bool)
    hidden = hidden + proj(attend(q, target_key.double(), target_value.double(), every), "cross_attn.o_proj")

    x = rms_norm(hidden, w["post_cross_attention_layernorm.weight"], cfg.rms_norm_eps)
    hidden = hidden + proj(F.silu(proj(x, "mlp.gate_proj")) * proj(x, "mlp.up_proj"), "mlp.down_proj")
    return hidden @ draft.target.get_output_embeddings().weight.double().T


def official_allowed(positions, root, depth, width, row, window, chain):
    """LongSpec's rule from its definition, over the absolute `positions [L]` of a path whose tree part starts at
    `root`: chain (and root) queries see the `window` positions before them and themselves; a tree level's row `row`
    of `width` nodes sees committed positions from `root - window - width + row` on, and its whole tree path."""
    if chain or depth == 0:
        return positions >= positions[-1] - window
    return (positions >= root) | (positions >= root - window - width + row)


def sink_window_allowed(positions, sink, window):
    """The project's rule from its definition: the first `sink` positions and the last `window` up to the query."""
    return (positions < sink) | (positions > positions[-1] - window)


def compare_with_reference(draft, ids, tree, levels, state, allowed_of):
    """Max |draft - reference| over the logits of every node the draft ran; `allowed_of(positions, root, depth,
    width, row)` gives the keys the reference lets that node see."""
    n = ids.shape[1]
    key, value = state.cache.layers[-1].keys[0], state.cache.layers[-1].values[0]  # [Hkv, n, D]
    node_paths, depths = paths(tree), tree.depths.tolist()
    starts = [depths.index(d) for d in range(len(levels))]
    errors = []
    for depth, logits in enumerate(levels):
        width = logits.shape[1]
        for row in range(width):
            path = node_paths[starts[depth] + row]
            tokens = torch.cat([ids[0], tree.tokens[0, path]])
            positions = torch.arange(n + len(path))
            allowed = allowed_of(positions, n, depth, width, row)
            expected = reference_logits(draft, tokens, positions, allowed, key, value)
            errors.append((logits[0, row].double() - expected).abs().max().item())
    return max(errors)


# ---------------------------------------------------------------------------------------------------------------------
# the official rule at contexts beyond its window


@pytest.mark.parametrize("tree_shape", [CHAIN, TREE], ids=["chain", "tree"])
def test_official_rule_matches_the_reference_beyond_512_tokens(tmp_path, tree_shape):
    draft = official_draft(tmp_path)
    assert (draft.config.window_rule, draft.config.sink_size, draft.config.window_size) == ("official", 0, 512)
    ids = random_prompt(650, seed=2)
    tree, levels, state = draft_round(draft, ids, torch.tensor([7]), tree_shape)
    assert len(levels) == len(tree_shape)
    chain = all(width == 1 for width in tree_shape)

    def official(positions, root, depth, width, row):
        return official_allowed(positions, root, depth, width, row, 512, chain)

    error = compare_with_reference(draft, ids, tree, levels, state, official)
    assert error < 2e-5, error  # fp32 rounding of logits of magnitude ~4

    # the check has teeth: one committed key more for every query shows in the logits
    def one_more(positions, root, depth, width, row):
        allowed = official(positions, root, depth, width, row)
        return allowed | (positions == positions[allowed][0] - 1)

    assert compare_with_reference(draft, ids, tree, levels, state, one_more) > 50 * max(error, 1e-7)


def test_official_cache_keeps_the_widest_level_and_stays_constant():
    target = tiny_target("llama")
    draft = LongSpecDraftModel.from_target(target, sink_size=0, window_size=16, window_rule="official")
    draft.generation_config.tree_shape = [4, 16, 16, 2]
    short, long = draft.start(random_prompt(300), None, None).cache, draft.start(random_prompt(3000), None, None).cache
    assert short.nbytes() == long.nbytes() and long.get_stored_length() == 16 + 16
    draft.generation_config.tree_shape = [1, 1, 1]  # the official chain slides one window along the path
    assert draft.start(random_prompt(300), None, None).cache.get_stored_length() == 16


def test_a_wider_tree_than_the_cache_was_sized_for_is_refused():
    target = tiny_target("llama")
    draft = LongSpecDraftModel.from_target(target, sink_size=0, window_size=16, window_rule="official")
    draft.generation_config.tree_shape = [1, 1, 1]
    ids = random_prompt(40)
    state = target_state(target, ids)
    with pytest.raises(ValueError, match="generation_config.tree_shape"):
        draft.draft(draft.start(ids, None, state), torch.tensor([3]), state.next_positions, state, (2, 4, 2))


def test_official_rule_in_a_left_padded_batch_matches_single_rows(tmp_path):
    draft = official_draft(tmp_path)
    draft.config.window_size = 24  # a small window, so both rows evict
    lengths, width = (80, 61), 80
    prompts = [random_prompt(n, seed=n) for n in lengths]
    ids = torch.stack([F.pad(p[0], (width - p.shape[1], 0)) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - n for n in lengths]).long()
    roots = torch.tensor([5, 9])
    _, batch_levels, _ = draft_round(draft, ids, roots, TREE, mask)
    for b, prompt in enumerate(prompts):
        _, levels, _ = draft_round(draft, prompt, roots[b : b + 1], TREE)
        for depth, logits in enumerate(levels):
            torch.testing.assert_close(batch_levels[depth][b : b + 1], logits, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# training and inference apply the same rule


@pytest.mark.parametrize("rule,tree_shape,sink,window,prompt", [
    ("sink_window", CHAIN, 2, 8, 30),
    ("sink_window", TREE, 2, 8, 30),
    ("official", CHAIN, 0, 8, 30),
    ("sink_window", CHAIN, 4, 2, 30),  # a window shorter than the chain: it slides past the root
    ("sink_window", TREE, 2, 1, 1),  # ... and a prompt shorter than the sinks: the root is a sink, its child is not
    ("official", CHAIN, 0, 2, 30),
])
def test_inference_sees_what_training_trains(rule, tree_shape, sink, window, prompt):
    """Each drafted node's logits equal a teacher-forced training forward over its path (committed tokens, then its
    ancestors), with the training masks: the self-attention window and the cross-attention lag of its depth."""
    target = tiny_target("qwen2")
    torch.manual_seed(3)
    draft = perturbed(LongSpecDraftModel.from_target(target, sink_size=sink, window_size=window, window_rule=rule))
    ids = random_prompt(prompt, seed=4)
    tree, levels, state = draft_round(draft, ids, torch.tensor([11]), tree_shape)
    key, value = state.cache.layers[-1].keys, state.cache.layers[-1].values  # [1, Hkv, n, D]
    node_paths, depths = paths(tree), tree.depths.tolist()
    keys = window + (rule == "official")
    for depth, logits in enumerate(levels):
        for row in range(logits.shape[1]):
            path = node_paths[depths.index(depth) + row]
            tokens = torch.cat([ids[0], tree.tokens[0, path]])[None]
            length = tokens.shape[1]
            # the target KV of the path's own tokens exists in training; the lag hides it, as inference lacks it
            padded = [torch.cat([t, t[:, :, -1:].expand(-1, -1, length - prompt, -1)], 2) for t in (key, value)]
            self_mask = tree_attention_bias(self_attention_allowed(length, sink, keys), torch.float32)[None, None]
            cross_mask = tree_attention_bias(cross_attention_allowed(length, depth + 1), torch.float32)[None, None]
            with torch.no_grad():
                trained = draft(tokens, torch.arange(length)[None], *padded, None, self_mask, cross_mask)
            torch.testing.assert_close(logits[0, row], trained[0, -1], rtol=0, atol=2e-5)


def test_sink_window_rule_matches_its_definition():
    target = tiny_target("llama")
    torch.manual_seed(5)
    draft = perturbed(LongSpecDraftModel.from_target(target, sink_size=3, window_size=20))
    ids = random_prompt(90, seed=6)
    tree, levels, state = draft_round(draft, ids, torch.tensor([4]), TREE)

    def definition(positions, root, depth, width, row):
        return sink_window_allowed(positions, 3, 20)

    assert compare_with_reference(draft, ids, tree, levels, state, definition) < 2e-5


# ---------------------------------------------------------------------------------------------------------------------
# the setting


def test_window_rule_setting(tmp_path):
    target = tiny_target("llama")
    with pytest.raises(ValueError, match="window_rule must be one of 'sink_window', 'official'"):
        LongSpecDraftConfig.from_target_config(target.config, window_rule="flash")
    draft = LongSpecDraftModel.from_target(target, window_rule="official")
    draft.save_pretrained(tmp_path / "official")
    assert LongSpecDraftModel.from_pretrained(tmp_path / "official").config.window_rule == "official"
    # drafts saved before the setting existed were trained with the project's rule, which is the default
    config = json.loads((tmp_path / "official" / "config.json").read_text())
    del config["window_rule"]
    (tmp_path / "official" / "config.json").write_text(json.dumps(config))
    assert LongSpecDraftModel.from_pretrained(tmp_path / "official").config.window_rule == "sink_window"
    shipped = Path(__file__).resolve().parents[1] / "drafts" / "smollm2-135m-instruct"
    assert LongSpecDraftConfig.from_pretrained(shipped).window_rule == "sink_window"


# ---------------------------------------------------------------------------------------------------------------------
# greedy output does not depend on the rule


@pytest.mark.parametrize("rule", ["sink_window", "official"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("tree_shape", [(1, 1, 1, 1), (4, 16, 16, 16, 16)], ids=["chain", "beam"])
def test_both_rules_are_lossless(rule, family, tree_shape):
    target = tiny_target(family)
    ids = random_prompt(120, seed=9)
    expected = target.generate(ids, do_sample=False, max_new_tokens=24)
    torch.manual_seed(1)
    draft = LongSpecDraftModel.from_target(target, sink_size=0 if rule == "official" else 4, window_size=16,
                                           window_rule=rule)
    draft.generation_config.tree_shape = list(tree_shape)
    out = target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=24)
    assert torch.equal(out, expected)
