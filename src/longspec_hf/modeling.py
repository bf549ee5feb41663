"""The LongSpec draft: one GliDe-style decoder layer on top of a frozen target.

    h = embed(x)                                             (target's embeddings, shared)
    h = h + SelfAttn(norm1(h))     over the draft's own sink+window cache
    h = h + CrossAttn(norm2(h))    over the target's last-layer KV cache (committed tokens only)
    h = h + MLP(norm3(h))          gated (SwiGLU for silu targets)
    logits = lm_head(h)                                      (target's head, shared; no final norm)

The draft's self-attention keys and values depend only on (token, position) — its input is the embedding — so the
draft never has to read the whole prompt: :meth:`LongSpecDraftModel.start` computes the KV of the sink and window
tokens directly, which keeps the draft's prefill as constant-size as its memory.

Which of those tokens a query sees is the config's ``window_rule`` (:class:`WindowRule`): the rule the draft was
trained with, applied alike by training (:mod:`longspec_hf.training.objective`) and by :meth:`LongSpecDraftModel.draft`.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache

from .cache import SinkWindowCache, sink_window_slots
from .checkpoints import DraftCheckpointMixin
from .configuration import BINDING_ATTRIBUTES, SPECIAL_TOKENS, LongSpecDraftConfig, last_layer_view
from .drafting import Drafter, DraftState, target_last_layer_kv
from .probe import check_supported_target, last_layer_kv_geometry
from .support import UnsupportedTargetError
from .tree import (
    AUTO,
    DraftTree,
    TreeGrowth,
    build_beam_tree,
    setting_envelope,
    tree_attention_bias,
    tree_envelope,
)
from .vocabulary import check_vocabulary, subset_head


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x [B, H, q, D]`, `cos/sin [B, q, R]` (as returned by transformers' rotary embedding modules), `R <= D`.

    With partial rotary (`R < D`, e.g. `partial_rotary_factor`), the first `R` dims rotate and the rest pass.
    """
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def family_rotary_function(rotary: nn.Module, rotary_kwargs: dict, head_dim: int) -> Callable:
    """How the target's family rotates its queries and keys: its modeling file's `apply_rotary_pos_emb(q, k, cos,
    sin)` (interleaved halves in GLM, half-size tables in gpt-oss, ...), or :func:`apply_rope` where the family has
    none of that signature. The draft's queries meet the target's keys, so they must turn alike.

    Some families cut the pass-through dims of partial rotary off in their attention module rather than in their
    rotary function (Phi): which way the function wants its input is tried once, here, on a dummy head.
    """
    family = getattr(sys.modules.get(type(rotary).__module__), "apply_rotary_pos_emb", None)
    if family is None:
        return apply_rope
    try:
        params = list(inspect.signature(family).parameters.values())
    except (TypeError, ValueError):
        return apply_rope
    # (q, k, cos, sin, ...) in most families; (x, cos, sin, ...) where one tensor turns at a time (Gemma 4).
    single = len(params) >= 3 and params[1].name == "cos"
    arity = 3 if single else 4
    required = [p for p in params[arity:] if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if len(params) < arity or required:
        return apply_rope
    if single:
        family = _pair_of(family)
    weight = next(rotary.buffers(), None)
    device = weight.device if weight is not None else None
    x = torch.ones(1, 1, 2, head_dim, device=device)
    cos, sin = rotary(x, torch.arange(2, device=device)[None], **rotary_kwargs)
    for candidate in (functools.partial(_rotate_whole, family), functools.partial(_rotate_split, family)):
        try:
            if candidate(x, cos, sin).shape == x.shape:
                return candidate
        except (RuntimeError, TypeError, ValueError, IndexError):
            continue
    return apply_rope


def _pair_of(single: Callable) -> Callable:
    """A one-tensor rotary function `(x, cos, sin)` under the two-tensor calling convention `(q, k, cos, sin)`."""
    return lambda q, k, cos, sin: (single(q, cos, sin), single(k, cos, sin))


def _rotate_whole(family: Callable, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return family(x, x, cos, sin)[0]


def _rotate_split(family: Callable, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    return torch.cat([family(x[..., :rot], x[..., :rot], cos, sin)[0], x[..., rot:]], dim=-1)


def rotary_call_kwargs(rotary: nn.Module, text_config) -> dict:
    """Extra arguments of the target's rotary module: families with one rotary per layer type (Gemma 3, OLMo 3) take
    `layer_type`; the draft uses the last layer's, whose keys it cross-attends to."""
    try:
        params = inspect.signature(rotary.forward).parameters
    except (TypeError, ValueError):
        return {}
    layer_types = getattr(text_config, "layer_types", None)
    if "layer_type" in params and layer_types:
        return {"layer_type": layer_types[-1]}
    return {}


def layer_has_rotary(rotary: nn.Module, rotary_kwargs: dict) -> bool:
    """False where the layer the draft follows has no rotary embedding (a NoPE global layer among rotary ones, as in
    Beam): its rotary module then knows no parameters for that layer type, and the draft turns nothing either."""
    rope_type = getattr(rotary, "rope_type", None)
    layer_type = rotary_kwargs.get("layer_type")
    return not (layer_type is not None and isinstance(rope_type, dict) and layer_type not in rope_type)


# ---------------------------------------------------------------------------------------------------------------------
# window rules: what a draft query sees of the committed tokens and of its tree (LongSpecDraftConfig.window_rule)


def path_window_keys(window_rule: str, window_size: int) -> int:
    """Keys a token sees along its own path (committed tokens, then its tree ancestors), itself included, under the
    rule's sliding window: the mask training applies at every position."""
    # The official window is flash-attention's (window_size, -1): window_size keys to the left, plus the query.
    return window_size + 1 if window_rule == "official" else window_size


def committed_distance(valid: torch.Tensor, sink: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the committed slots `valid [B, C]` of a sink+window cache (the sinks, then the newest tokens, in order):
    `(distance [B, C], is_sink [B, C])`, how far back from the root each slot's token is (1 = the newest committed
    token), and whether it is one of its row's first `sink` tokens. Meaningless where not `valid`."""
    rank = valid.long().cumsum(-1)  # [B, C], 1-based among the row's real slots
    return rank[:, -1:] - rank + 1, valid & (rank <= sink)


@dataclass(frozen=True)
class WindowRule:
    """The window rule of one drafting round: a config's ``window_rule`` for a given tree shape."""

    sink: int
    window: int
    path_keys: int  # keys a token sees along its path, itself included (see path_window_keys)
    # Levels below the root window the committed tokens per level, not along each path: LongSpec's tree decoder.
    level_windows: bool
    widest_level: int  # the widest level that runs through the draft below the root (the last level never does)

    @classmethod
    def of(cls, config: LongSpecDraftConfig, tree_shape: Sequence[int]) -> WindowRule:
        official = config.window_rule == "official"
        return cls(
            sink=config.sink_size,
            window=config.window_size,
            path_keys=path_window_keys(config.window_rule, config.window_size),
            # The official chain decoder (all widths 1) slides one window along the path, like its trainer.
            level_windows=official and any(width > 1 for width in tree_shape),
            widest_level=max(tree_shape[:-1], default=0),
        )

    @property
    def committed_kept(self) -> int:
        """Committed tokens after the sinks a cache must keep for every query of the round to see its window."""
        keep = max(self.window, self.path_keys - 1)
        return keep + self.widest_level if self.level_windows else keep

    def committed_reach(self, depth: int, width: int, device=None) -> torch.Tensor:
        """`[m]`: how many of the newest committed tokens each of the `m = width` queries of the level at `depth` sees
        (the sinks aside)."""
        if self.level_windows and depth > 0:
            # flash-attention aligns a window to the bottom right when the level's m queries follow the committed keys
            return self.window + width - torch.arange(width, device=device)
        return torch.full((width,), self.path_keys - 1 - depth, device=device)

    def committed_visible(self, distance: torch.Tensor, is_sink: torch.Tensor, valid: torch.Tensor, depth: int,
                          width: int) -> torch.Tensor:
        """`[B, m, C]` bool: the committed slots each query of the level sees (see :func:`committed_distance`)."""
        reach = self.committed_reach(depth, width, distance.device)  # [m]
        return valid[:, None] & (is_sink[:, None] | (distance[:, None] <= reach[None, :, None]))

    def tree_visible(self, node_depths: list[int], depth: int, root_positions: torch.Tensor) -> torch.Tensor | None:
        """`[B, 1, n]` bool: the tree nodes (of depths `node_depths`) a query at `depth` may see if they are its
        ancestors, or None for all of them: a path window reaches past the root unless it is no longer than the tree
        is deep (toy windows); tokens among a row's first `sink` stay visible."""
        if (self.level_windows and depth > 0) or depth < self.path_keys:
            return None  # decided on the host: no per-level device work or transfer in real configurations
        depths = torch.tensor(node_depths, device=root_positions.device)  # [n]
        within = (depth - depths) < self.path_keys  # [n]
        is_sink = (root_positions[:, None] + depths[None]) < self.sink  # [B, n]
        return (within[None] | is_sink)[:, None]


class DraftAttention(nn.Module):
    """Projections of one attention block; the attention itself is computed by the caller's kind (self/cross)."""

    def __init__(self, config: LongSpecDraftConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def split(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        b, q, _ = x.shape
        return proj(x).view(b, q, -1, self.head_dim).transpose(1, 2)  # [B, H, q, D]

    def merge(self, attn: torch.Tensor) -> torch.Tensor:
        b, _, q, _ = attn.shape
        return self.o_proj(attn.transpose(1, 2).reshape(b, q, -1))


class GatedMLP(nn.Module):
    def __init__(self, config: LongSpecDraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class BoundTarget:
    """The target parts the draft shares (held outside the module tree so they are never saved with the draft)."""

    model: PreTrainedModel
    embed_tokens: nn.Module
    lm_head: nn.Module
    rotary_emb: nn.Module
    rotary_kwargs: dict  # e.g. the layer type of a per-layer-type rotary (rotary_call_kwargs)
    # (x [B, H, q, D], cos, sin) -> x rotated as the family rotates (family_rotary_function); None: no rotary there
    rotate: Callable | None


def find_rotary_embedding(target: PreTrainedModel) -> nn.Module | None:
    base = getattr(target, "base_model", target)
    for owner in (base, getattr(base, "language_model", None)):
        if owner is not None and isinstance(getattr(owner, "rotary_emb", None), nn.Module):
            return owner.rotary_emb
    return None


class LongSpecDraftModel(DraftCheckpointMixin, Drafter, PreTrainedModel):
    """One-layer LongSpec draft. Use it as ``target.generate(input_ids, assistant_model=draft)``.

    Tree settings live on ``draft.generation_config``: ``tree_shape`` is ``"auto"`` by default (each round grows
    the tree that pays most on this device, see :class:`~longspec_hf.auto_tree.AutoTree`) or fixed level widths
    (the official beam tree ``[4, 16, 16, 16, 16]``; a chain of ``k`` draft tokens is ``[1] * k``). After each
    ``generate`` call, ``draft.stats`` holds the decoding statistics.
    """

    config_class = LongSpecDraftConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = []

    def __init__(self, config: LongSpecDraftConfig):
        super().__init__(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DraftAttention(config)
        self.post_self_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross_attn = DraftAttention(config)  # k/v projections exist in the official layout but are unused
        self.post_cross_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config)
        self.generation_config = GenerationConfig(tree_shape=AUTO)
        self._bound: BoundTarget | None = None
        # Set by from_target (random weights); cleared once the draft is trained or given weights.
        self._untrained = False
        self._warned_untrained = False
        self.stats = None
        # The token ids the draft scores, most frequent first (see vocabulary.py); None: the whole vocabulary.
        size = config.draft_vocab_size
        self.register_buffer("draft_vocab", None if size is None else torch.arange(size))
        self._head_rows: tuple | None = None  # (key, weight, bias): the head's draft_vocab rows, gathered once
        self.post_init()

    # ----------------------------------------------------------------------------------------------------------------
    # construction and binding

    @classmethod
    def from_target(
        cls, target: PreTrainedModel, sink_size: int = 4, window_size: int = 512, **config_kwargs
    ) -> LongSpecDraftModel:
        """A fresh, randomly initialised — untrained — draft for ``target``, bound to it, on its device and dtype.

        Its drafts are mostly rejected (tau near 1), so generation is slower than without it (the output is the same);
        ``generate`` warns about that until the draft is trained (``longspec train``, or any loop that puts it in
        training mode) or given weights (``load_state_dict``). For a trained draft use :meth:`from_pretrained`.
        ``config_kwargs`` set other config fields, e.g. ``window_rule`` (default "sink_window", the rule
        ``longspec train`` trains; see :class:`LongSpecDraftConfig`).
        """
        config = LongSpecDraftConfig.from_target_config(
            target.config, sink_size=sink_size, window_size=window_size, **config_kwargs
        )
        draft = cls(config).to(device=target.device, dtype=target.dtype)
        draft.bind(target)
        draft._untrained = True
        return draft

    def train(self, mode: bool = True) -> LongSpecDraftModel:
        if mode:
            self._untrained = False  # a training loop is about to update the weights
        return super().train(mode)

    def load_state_dict(self, state_dict, *args, **kwargs):
        self._untrained = False
        return super().load_state_dict(state_dict, *args, **kwargs)

    @property
    def target(self) -> PreTrainedModel | None:
        return None if self._bound is None else self._bound.model

    def bind(self, target: PreTrainedModel) -> None:
        """Share ``target``'s embeddings, LM head and rotary embedding; refuse a target the draft was not built for
        or one on another device or dtype. Called by ``generate`` on every call (cheap once bound); warns when the
        draft was made for a model of the same shape under another name, or is untrained."""
        if self._bound is None or self._bound.model is not target:
            self._bind_new(target)
        check_placement(self, target)
        if self._untrained and not self._warned_untrained:
            self._warned_untrained = True
            warnings.warn(
                "This LongSpec draft is untrained (made by LongSpecDraftModel.from_target and neither trained nor "
                "loaded): its tokens are mostly rejected (tau near 1), so generate() is slower than without it "
                "(the output is the same). Load a trained draft with LongSpecDraftModel.from_pretrained(...) or "
                "train one with `longspec train`.",
                UserWarning, stacklevel=2,
            )

    def _bind_new(self, target: PreTrainedModel) -> None:
        check_supported_target(target)
        text = last_layer_view(target.config.get_text_config(decoder=True))
        mismatches = []
        for name in BINDING_ATTRIBUTES:
            expected = getattr(self.config, name)
            actual = getattr(text, name, None)
            if name == "num_key_value_heads" and actual is None:
                actual = text.num_attention_heads
            if name == "head_dim" and actual is None:
                actual = text.hidden_size // text.num_attention_heads
            if expected != actual:
                mismatches.append(f"{name}={expected} (target has {actual})")
        # The draft's queries are rotated by the target's rotary embedding against the target's keys: a draft trained
        # under other RoPE settings would bind without error and draft poorly.
        target_rope = dict(getattr(text, "rope_parameters", None) or {})
        for key, expected in (self.config.rope_parameters or {}).items():
            if key in target_rope and target_rope[key] != expected:
                mismatches.append(f"rope_parameters[{key!r}]={expected} (target has {target_rope[key]})")
        if mismatches:
            raise ValueError(
                f"This LongSpec draft was built for a different target ({self.config.target_name_or_path or 'unknown'}"
                f"): {', '.join(mismatches)}. Use a draft trained for this target, or create one with "
                "LongSpecDraftModel.from_target(target)."
            )
        rotary = find_rotary_embedding(target)
        embed, head = target.get_input_embeddings(), target.get_output_embeddings()
        missing = [part for part, found in (("rotary embedding (RoPE)", rotary), ("input embeddings", embed),
                                            ("LM head", head)) if found is None]
        if missing:
            raise UnsupportedTargetError(
                f"{type(target).__name__} has no {' or '.join(missing)} where a LongSpec draft expects them (it shares "
                "the target's); use a causal LM with RoPE (e.g. Llama, Qwen3, Mistral, Gemma 3), or "
                "SelfDraft.from_target(target)."
            )
        geometry = last_layer_kv_geometry(target)
        expected = ((self.config.num_key_value_heads, self.config.head_dim),) * 2
        if geometry is not None and tuple(geometry) != expected:
            (kh, kd), (vh, vd) = geometry
            raise UnsupportedTargetError(
                f"{type(target).__name__}'s last layer caches keys of {kh} heads x {kd} dims and values of {vh} x "
                f"{vd}, not the {expected[0][0]} x {expected[0][1]} its config declares (e.g. multi-head latent "
                "attention); a LongSpec draft cross-attends to them as declared, so none can be built for it. Use "
                "SelfDraft.from_target(target) instead."
            )
        rotary_kwargs = rotary_call_kwargs(rotary, text)
        rotate = (family_rotary_function(rotary, rotary_kwargs, self.config.head_dim)
                  if layer_has_rotary(rotary, rotary_kwargs) else None)
        self._bound = BoundTarget(model=target, embed_tokens=embed, lm_head=head, rotary_emb=rotary,
                                  rotary_kwargs=rotary_kwargs, rotate=rotate)
        for name in SPECIAL_TOKENS:  # the target's token ids are the draft's (saved with it, read by pipelines)
            setattr(self.config, name, getattr(text, name, None))
        mismatch = other_target_name(self.config, target.config)
        if mismatch:
            warnings.warn(mismatch, UserWarning, stacklevel=3)

    def _require_bound(self) -> BoundTarget:
        if self._bound is None:
            raise ValueError(
                "This draft is not bound to a target: call draft.bind(target) or pass it to target.generate."
            )
        return self._bound

    def get_input_embeddings(self) -> nn.Module | None:
        return None if self._bound is None else self._bound.embed_tokens

    def set_draft_vocabulary(self, token_ids: torch.Tensor | Sequence[int] | None) -> None:
        """Score only `token_ids` (e.g. :func:`~longspec_hf.vocabulary.ranked_vocabulary` of the target's outputs)
        when drafting; None scores the whole vocabulary again. Needs no retraining: the draft uses the target's
        head rows of those tokens. The output of ``generate`` does not change, only which tokens can be drafted."""
        if token_ids is None:
            self.draft_vocab, self.config.draft_vocab_size = None, None
        else:
            ids = check_vocabulary(token_ids, self.config.vocab_size)
            device = next(self.parameters()).device
            self.draft_vocab, self.config.draft_vocab_size = ids.to(device), len(ids)
        self._head_rows = None

    def _subset_head(self, head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's rows of `draft_vocab`, gathered once per (head weights, vocabulary) rather than per step."""
        weight = getattr(head, "weight", None)
        if not isinstance(head, nn.Linear) or weight is None:
            raise UnsupportedTargetError(
                f"draft_vocab_size needs a linear LM head; {type(self.target).__name__}'s is a "
                f"{type(head).__name__}. Use the whole vocabulary: draft.set_draft_vocabulary(None).")
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, self.draft_vocab.data_ptr(),
               self.draft_vocab._version)
        if self._head_rows is None or self._head_rows[0] != key:
            self._head_rows = (key, *subset_head(head, self.draft_vocab))
        return self._head_rows[1], self._head_rows[2]

    def get_output_embeddings(self) -> nn.Module | None:
        return None if self._bound is None else self._bound.lm_head

    # ----------------------------------------------------------------------------------------------------------------
    # the layer

    def _rope(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        bound = self._require_bound()
        if bound.rotate is None:
            return None, None
        return bound.rotary_emb(x, position_ids, **bound.rotary_kwargs)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        rotate = self._require_bound().rotate
        return x if rotate is None else rotate(x, cos, sin)

    def self_attention_kv(self, input_ids: torch.LongTensor, position_ids: torch.LongTensor):
        """Self-attention KV of tokens `[B, q]` at `position_ids [B, q]`: `([B, Hkv, q, D], [B, Hkv, q, D])`.

        They depend only on (token, position) — the layer's input is the embedding — which is what lets the draft
        skip the evicted middle of a prompt and recompute committed tokens exactly.
        """
        hidden = self._require_bound().embed_tokens(input_ids)
        cos, sin = self._rope(hidden, position_ids)
        x = self.input_layernorm(hidden)
        k = self._rotate(self.self_attn.split(x, self.self_attn.k_proj), cos, sin)
        v = self.self_attn.split(x, self.self_attn.v_proj)
        return k, v


    def forward(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        target_key: torch.Tensor,
        target_value: torch.Tensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        vocab_subset: bool = False,
    ) -> torch.Tensor:
        r"""Run the draft layer and return logits `[B, q, V]` (`[B, q, V']` with `vocab_subset`).

        Args:
            input_ids: `[B, q]` tokens.
            position_ids: `[B, q]` absolute positions (also used for the cross-attention queries).
            target_key / target_value: `[B, Hkv, L, D]` target last-layer KV (post-RoPE) the draft may see.
            past_key_values: the draft's cache (a [`SinkWindowCache`]); new KV are appended to it.
            attention_mask: additive `[B, 1, q, S]` mask over the self-attention keys (cache + new tokens); `None`
                means every key is visible (only valid when `q == 1`). It carries the window rule: build it with
                :class:`WindowRule` (as :meth:`draft` does) or `training.self_attention_allowed`, not ad hoc.
            cross_attention_mask: additive `[B, 1, q, L]` mask over the target's keys, or `None` (all visible).
            vocab_subset: return the logits of the `draft_vocab` tokens only, in its order (`V' = draft_vocab_size`),
                which is all the draft computes; otherwise tokens outside it get the dtype's minimum.
        """
        bound = self._require_bound()
        hidden = bound.embed_tokens(input_ids)  # [B, q, hidden]
        cos, sin = self._rope(hidden, position_ids)

        # 1. self-attention over the draft's own sink+window cache
        x = self.input_layernorm(hidden)
        q = self._rotate(self.self_attn.split(x, self.self_attn.q_proj), cos, sin)
        k = self._rotate(self.self_attn.split(x, self.self_attn.k_proj), cos, sin)
        v = self.self_attn.split(x, self.self_attn.v_proj)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, 0)
        mask = None if attention_mask is None else attention_mask.to(q.dtype)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # [B, H, q, D]
        hidden = hidden + self.self_attn.merge(attn)

        # 2. cross-attention over the target's last-layer KV cache
        x = self.post_self_attention_layernorm(hidden)
        q = self._rotate(self.cross_attn.split(x, self.cross_attn.q_proj), cos, sin)
        mask = None if cross_attention_mask is None else cross_attention_mask.to(q.dtype)
        attn = F.scaled_dot_product_attention(
            q, target_key.to(q.dtype), target_value.to(q.dtype), attn_mask=mask, enable_gqa=True
        )
        hidden = hidden + self.cross_attn.merge(attn)

        # 3. MLP, then straight into the target's head (no final norm, as in the official checkpoints)
        hidden = hidden + self.mlp(self.post_cross_attention_layernorm(hidden))
        if self.draft_vocab is None:
            return bound.lm_head(hidden)  # [B, q, V]

        # 4. only the draft vocabulary's rows of the head: most of a step's work otherwise
        logits = F.linear(hidden, *self._subset_head(bound.lm_head))  # [B, q, V']
        if vocab_subset:
            return logits
        full = logits.new_full((*logits.shape[:-1], bound.lm_head.weight.shape[0]), torch.finfo(logits.dtype).min)
        return full.index_copy_(-1, self.draft_vocab, logits)  # [B, q, V]

    # ----------------------------------------------------------------------------------------------------------------
    # Drafter protocol (used by the decode loop)

    def start(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, target_state) -> DraftState:
        """Fill a fresh sink+window cache with the prompts, computing only the KV it keeps (constant cost): the sinks
        and the committed tokens the window rule needs for ``generation_config.tree_shape``."""
        n = input_ids.shape[1]
        sink = self.config.sink_size
        envelope = setting_envelope(getattr(self.generation_config, "tree_shape", None))
        window = WindowRule.of(self.config, envelope).committed_kept
        valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                 else attention_mask.bool())  # [B, n]
        src, kept = sink_window_slots(valid, sink, window)  # [B, C]
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0).gather(1, src)
        cache = SinkWindowCache(sink_size=sink, window_size=window, num_layers=1)
        k, v = self.self_attention_kv(input_ids.gather(1, src), positions)
        cache.commit(k, v, None if attention_mask is None else kept)
        cache.layers[0].cumulative_length = n  # the evicted middle still counts towards absolute positions
        return DraftState(cache=cache)

    def draft(self, state: DraftState, root_tokens: torch.Tensor, root_positions: torch.Tensor, target_state,
              tree_shape: tuple[int, ...] | TreeGrowth) -> DraftTree:
        cache: SinkWindowCache = state.cache
        rule = WindowRule.of(self.config, tree_envelope(tree_shape))
        if rule.committed_kept > cache.window_size:
            raise ValueError(
                f"tree_shape {list(tree_envelope(tree_shape))} needs the draft's cache to keep {rule.committed_kept} "
                "committed tokens "
                f"under the {self.config.window_rule!r} window rule, but start() kept {cache.window_size} (it sizes "
                "the cache for draft.generation_config.tree_shape): set that before generating."
            )
        target_key, target_value = target_last_layer_kv(target_state.cache)
        cross_bias = target_state.key_bias(target_key.dtype)  # [B, 1, 1, L] or None
        valid = cache.layers[0].valid  # [B, C] or None
        if valid is None:
            valid = torch.ones(len(root_tokens), cache.get_stored_length(), dtype=torch.bool, device=root_tokens.device)
        distance, is_sink = committed_distance(valid, rule.sink)  # [B, C] each, once per round
        forward = state.forward_of(self)
        node_depths: list[int] = []  # every tree node so far, in creation order
        cache.begin_speculation()

        def step(tokens: torch.Tensor, positions: torch.Tensor, tree_bias: torch.Tensor) -> torch.Tensor:
            width = tokens.shape[1]
            depth = node_depths[-1] + 1 if node_depths else 0  # one step per level, root first
            node_depths.extend([depth] * width)
            committed = rule.committed_visible(distance, is_sink, valid, depth, width)  # [B, m, C]
            tree = rule.tree_visible(node_depths, depth, root_positions)
            if tree is not None:
                tree_bias = tree_bias.masked_fill(~tree, torch.finfo(tree_bias.dtype).min)  # [B, m, n]
            bias = torch.cat([tree_attention_bias(committed, tree_bias.dtype), tree_bias], dim=-1)  # [B, m, C + n]
            return forward(tokens, positions, target_key, target_value, cache, bias[:, None], cross_bias,
                           vocab_subset=True)

        return build_beam_tree(step, root_tokens, root_positions, tree_shape, self.draft_vocab)

    def commit(self, state: DraftState, tokens: torch.LongTensor, valid: torch.Tensor | None,
               start_positions: torch.Tensor) -> None:
        """Replace the speculative entries by the KV of the committed `tokens [B, a]` (root first).

        Recomputing is exact (the KV depend only on token and position) and also covers accepted leaves, which
        never went through a draft forward.
        """
        positions = start_positions[:, None] + torch.arange(tokens.shape[1], device=tokens.device)[None]
        k, v = self.self_attention_kv(tokens, positions)
        state.cache.commit(k, v, valid)

    def select_rows(self, state: DraftState, rows: torch.Tensor) -> None:
        state.cache.batch_select_indices(rows)


# Offline names of real models (loading.py), as the trainer records them, and the Hub id of the same model. Spelled
# out rather than imported: custom_generate/ ships this module without the loaders.
TARGET_ALIASES = {"offline:smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def comparable_name(name: str | None) -> str | None:
    """A model name that identifies the model across machines (a Hub id or an offline name), lower-cased as the Hub
    compares ids; None for nothing or a local path, whose folder name says nothing reliable about its weights."""
    if not name:
        return None
    name = TARGET_ALIASES.get(str(name), str(name))
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or os.path.exists(name):
        return None
    return name.lower()


def other_target_name(draft_config: LongSpecDraftConfig, target_config) -> str | None:
    """A one-line warning when the draft records another target (name, or revision of the same name) than the one it
    is bound to; None when they agree or either is unknown. Geometry cannot tell two models of one shape apart."""
    recorded, actual = draft_config.target_name_or_path, getattr(target_config, "_name_or_path", None)
    if comparable_name(recorded) is None or comparable_name(actual) is None:
        return None
    if comparable_name(recorded) != comparable_name(actual):
        return (f"This LongSpec draft was built for {recorded} but the target is {actual}: they have the same shape, "
                "so it binds, but it will draft poorly (the output is unaffected). Use a draft trained for this "
                "target.")
    revision, actual_revision = draft_config.target_revision, getattr(target_config, "_commit_hash", None)
    if revision and actual_revision and not (revision.startswith(actual_revision)
                                             or actual_revision.startswith(revision)):
        return (f"This LongSpec draft was built for {recorded} at revision {revision} but the target was loaded at "
                f"revision {actual_revision}: if its weights changed, the draft drafts worse (the output is "
                "unaffected).")
    return None


def check_placement(draft: nn.Module, target: PreTrainedModel) -> None:
    """The draft runs on the target's embeddings and KV cache, so both must share one device and dtype."""
    param = next(draft.parameters(), None)
    if param is None or (param.device == target.device and param.dtype == target.dtype):
        return
    raise ValueError(
        f"The draft is on {param.device} in {param.dtype} but the target is on {target.device} in {target.dtype}; "
        "move the draft first: draft.to(target.device, target.dtype)."
    )
