"""Hybrid tree attention for verification, registered in transformers' ``AttentionInterface``.

During verification the target attends from ``q`` tree tokens to ``P`` committed prefix keys plus the ``q`` tree
keys. A dense ``[q, P + q]`` masked attention cannot use the fast unmasked kernels, and the mask is pure overhead on
the prefix, where every key is visible. So the call is split:

1. prefix part: queries x prefix keys, **no mask** -> ``(o1, lse1)`` from a kernel that returns the log-sum-exp;
2. tree part: queries x tree keys with the tree mask (small, ``q x q``) -> ``(o2, lse2)``;
3. merge: ``lse = logaddexp(lse1, lse2)``, ``out = o1 * exp(lse1 - lse) + o2 * exp(lse2 - lse)``.

The merge is exact: softmax over the union of two key sets is the LSE-weighted mix of the two partial softmaxes. The
prefix keeps a mask only where one is genuinely needed (padding, or a sliding window shorter than the context).
"""

from __future__ import annotations

import importlib.util

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

HYBRID_ATTENTION_NAME = "longspec_hybrid"
BACKENDS = ("auto", "flash_attn", "sdpa_lse", "torch")


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`[B, Hkv, S, D]` -> `[B, H, S, D]` for grouped-query attention."""
    groups = num_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def torch_attention_lse(q, k, v, mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention in fp32: `q [B, H, q, D]`, `k/v [B, Hkv, S, D]`, additive `mask [B, 1|H, q, S]` or None.

    Returns `(out [B, H, q, D] fp32, lse [B, H, q] fp32)`. Query heads are grouped per KV head instead of copying
    the KV heads, so a long prefix is never duplicated.
    """
    b, h, n, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv
    qg = q.float().reshape(b, hkv, g * n, d)  # head h reads KV head h // g, as with repeat_interleave
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # [B, Hkv, g*q, S]
    if mask is not None:
        m = mask.float()
        m = m.expand(b, h, n, s) if m.shape[1] == h else m.expand(b, 1, n, s).unsqueeze(2).expand(b, 1, g, n, s)
        scores = scores + m.reshape(b, -1, g * n, s)
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, g*q]
    # A fully masked row has lse = -inf; its weights must be 0, not NaN.
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])
    out = torch.matmul(probs, v.float())  # [B, Hkv, g*q, D]
    return out.reshape(b, h, n, d), lse.reshape(b, h, n)


def _cpu_flash_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def sdpa_lse_attention(q, k, v, mask, scale) -> tuple[torch.Tensor, torch.Tensor] | None:
    """torch's fused SDPA ops that also return the LSE; `None` when no such op serves these inputs."""
    if q.device.type == "cpu":
        op = _cpu_flash_op()
        if op is None:
            return None
        # The CPU op handles grouped KV heads and a broadcast [B, 1, q, S] float mask natively.
        if mask is not None:
            mask = mask.to(q.dtype)
        out, lse = op(q, k, v, 0.0, False, attn_mask=mask, scale=scale)[:2]
        return out.float(), lse.float()
    if q.device.type == "cuda":
        op = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)
        if op is None:
            return None
        k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
        bias = None
        if mask is not None:
            bias = mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).contiguous()
        out, lse = op(q, k, v, bias, True, 0.0, False, scale=scale)[:2]
        return out.float(), lse[..., : q.shape[2]].float()
    return None


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_attention_lse(q, k, v, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn (CUDA, fp16/bf16, GQA native, no mask)."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise ImportError(
            "The flash_attn tree-attention backend needs flash-attn: pip install 'longspec-hf[flash]' (CUDA only)."
        ) from err
    out, lse, _ = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=False,
        return_attn_probs=True,
    )
    return out.transpose(1, 2).float(), lse[..., : q.shape[2]].float()


def prefix_attention_lse(q, k, v, mask, scale, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the tree queries over the committed prefix, with its LSE, on the requested backend."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown tree_attn_backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend == "flash_attn" and not flash_attn_available():
        raise ImportError(
            "The flash_attn tree-attention backend needs flash-attn: pip install 'longspec-hf[flash]' (CUDA only)."
        )
    wants_flash = backend == "flash_attn" or (backend == "auto" and flash_attn_available())
    if wants_flash and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attention_lse(q, k, v, scale)
    if backend != "torch":
        result = sdpa_lse_attention(q, k, v, mask, scale)
        if result is not None:
            return result
    return torch_attention_lse(q, k, v, mask, scale)


def merge_attention_states(o1, lse1, o2, lse2) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint key sets.

    `o: [B, H, q, D]`, `lse: [B, H, q]` (fp32). Returns `(out, lse)` over the union of the keys.
    """
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).nan_to_num(0.0)[..., None]
    w2 = torch.exp(lse2 - lse).nan_to_num(0.0)[..., None]
    return o1 * w1 + o2 * w2, lse


def hybrid_tree_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    tree_prefix_len: int | None = None,
    tree_prefix_masked: bool = False,
    tree_attn_backend: str = "auto",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    r"""`AttentionInterface` function: `query [B, H, q, D]`, `key/value [B, Hkv, P + q, D]`, additive
    `attention_mask [B, 1, q, P + q]`; returns `(out [B, q, H, D], None)`.

    `tree_prefix_len` (P) marks a verification forward; without it this is ordinary SDPA attention.
    `tree_prefix_masked` says the prefix carries padding, so its mask must be applied.
    """
    if tree_prefix_len is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, sliding_window=sliding_window,
            **kwargs,
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len, prefix_len = query.shape[2], tree_prefix_len
    tree_mask = None if attention_mask is None else attention_mask[..., prefix_len:]
    out, lse = torch_attention_lse(query, key[:, :, prefix_len:], value[:, :, prefix_len:], tree_mask, scale)
    if prefix_len > 0:
        window_bites = sliding_window is not None and prefix_len + q_len > sliding_window
        prefix_mask = None
        if attention_mask is not None and (tree_prefix_masked or window_bites):
            prefix_mask = attention_mask[..., :prefix_len]
        o1, lse1 = prefix_attention_lse(
            query, key[:, :, :prefix_len], value[:, :, :prefix_len], prefix_mask, scale, tree_attn_backend
        )
        out, lse = merge_attention_states(o1, lse1, out, lse)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register_hybrid_attention() -> None:
    """Register :func:`hybrid_tree_attention` (and the SDPA mask format) under :data:`HYBRID_ATTENTION_NAME`."""
    AttentionInterface.register(HYBRID_ATTENTION_NAME, hybrid_tree_attention)
    AttentionMaskInterface.register(HYBRID_ATTENTION_NAME, sdpa_mask)


def available_backends(device: str = "cpu") -> list[str]:
    """Backends that can serve the prefix part on `device` in this process."""
    backends = ["torch"]
    if (device == "cpu" and _cpu_flash_op() is not None) or (
        device == "cuda" and getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None) is not None
    ):
        backends.append("sdpa_lse")
    if device == "cuda" and flash_attn_available():
        backends.append("flash_attn")
    return backends
