"""Hybrid tree attention for verification, registered in transformers' ``AttentionInterface``.

During verification the target runs one forward over ``q`` tree tokens appended after ``P`` committed prefix tokens
already in its KV cache. Dense attention would need an additive ``[q, P + q]`` mask, which rules out the fast
mask-free kernels although the mask is all zeros over the (long) prefix. So the call is split in two:

1. prefix part: queries x ``keys[:P]``, **no mask** -> ``(o1, lse1)``, from a kernel that also returns the
   log-sum-exp of the scaled scores of each query row;
2. tree part: queries x ``keys[P:]`` (``q x q``, small) with the tree mask, plain fp32 matmul -> ``(o2, lse2)``;
3. merge, in fp32: ``lse = logaddexp(lse1, lse2)``, ``out = o1 * exp(lse1 - lse) + o2 * exp(lse2 - lse)``.

Why the merge is exact: for one query row with scores ``s_j``, ``o_A = sum_{j in A} e^{s_j} v_j / e^{lse_A}`` with
``lse_A = log sum_{j in A} e^{s_j}``. For disjoint key sets A and B, ``e^{lse_{A+B}} = e^{lse_A} + e^{lse_B}``, hence
``o_{A+B} = o_A e^{lse_A - lse_{A+B}} + o_B e^{lse_B - lse_{A+B}}``: the softmax over the union, not an approximation.
An empty (fully masked) part has ``lse = -inf`` and weight 0; the tree part always sees at least its own node.

The prefix keeps a mask only when one is genuinely needed: padding / placeholder slots (the caller passes
``tree_prefix_masked=True``), or a sliding window shorter than ``P + q``.

Prefix backends (``tree_attn_backend``): ``"flash_attn"`` (flash-attn package; CUDA, fp16/bf16, no mask),
``"sdpa_lse"`` (torch's LSE-returning fused SDPA ops), ``"torch"`` (plain fp32 matmul) and ``"auto"`` (the first of
those that serves the inputs). Unavailable or unsuitable backends fall through to the next one, down to ``"torch"``.

``"sdpa_lse"`` per device:

- CPU: ``_scaled_dot_product_flash_attention_for_cpu``, GQA native, float mask.
- CUDA: the torch kernels have no GQA, and copying the KV heads reads and writes the whole prefix again (measured
  12-19x slower than the right kernel on long prefixes). Instead the ``g`` query heads that share a KV head are
  stacked on the query axis, ``[B, H, q, D] -> [B, Hkv, g*q, D]``, which turns GQA into plain multi-head attention
  over the KV heads as they are. fp16/bf16 without a prefix mask: the flash op; with a mask, or fp32: the efficient
  op, with the mask stacked the same way. The keys/values are never copied, so they may be strided views of a larger
  preallocated cache (last dimension contiguous); a kernel that refuses the inputs falls through.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .support import UnsupportedTargetError, record_probe_call

HYBRID_ATTENTION_NAME = "longspec_hybrid"
BACKENDS = ("auto", "flash_attn", "sdpa_lse", "torch")

_HALF = (torch.float16, torch.bfloat16)
_FLASH_HINT = (
    "tree_attn_backend='flash_attn' needs the flash-attn package (CUDA only): pip install 'longspec-hf[flash]', "
    "or use tree_attn_backend='auto'."
)


# ---------------------------------------------------------------------------------------- the verification switch

_switch_lock = threading.Lock()
_switched: dict[int, list] = {}  # id(config) -> [the user's implementation, verifications in flight]


@contextmanager
def attention_implementation(model: PreTrainedModel, name: str):
    """Select the attention function `name` for the duration of one forward, then restore the user's choice.

    Only the verification forward switches, so prefill keeps the target's own (possibly faster) attention. The
    setting lives on the model's shared config, so threads sharing one model are kept exact: the switch is counted
    (the user's choice comes back when the last verification in flight ends), and any other forward that runs
    meanwhile reaches the hybrid function without verification arguments, which calls the user's own implementation
    (:func:`user_attention_implementation`) with a mask built for either (see ``attention.register_hybrid_attention``).
    """
    config = model.config.get_text_config(decoder=True)
    with _switch_lock:
        entry = _switched.setdefault(id(config), [config._attn_implementation, 0])
        entry[1] += 1
        config._attn_implementation = name
    try:
        yield
    finally:
        with _switch_lock:
            entry[1] -= 1
            if entry[1] == 0:
                config._attn_implementation = entry[0]
                del _switched[id(config)]


def user_attention_implementation(config) -> str | None:
    """The implementation the user chose for `config` while a verification has switched it, else None."""
    entry = _switched.get(id(config))
    return None if entry is None else entry[0]


# --------------------------------------------------------------------------------------------------------- helpers


def kv_groups(query: torch.Tensor, key: torch.Tensor) -> int:
    """Query heads per KV head, from the shapes (the module's `num_key_value_groups` is not trusted)."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads.")
    return heads // kv_heads


def repeat_kv_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`[B, Hkv, S, D]` -> `[B, H, S, D]`; query head h reads KV head h // groups, as transformers' `repeat_kv`."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def as_additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Boolean masks (True = visible, as transformers' `sdpa_mask` builds them) become additive ones."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -torch.inf)


def fully_masked_rows(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`[B, H, q]` bool: rows whose every key is masked with -inf (fused kernels report lse = 0 for them, not -inf)."""
    return torch.isneginf(mask).all(dim=-1).expand(shape)


def stack_query_heads(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """`[B, H, q, D]` -> `[B, Hkv, g*q, D]`: the g query heads of each KV head stacked on the query axis.

    Head h = kv * g + j (transformers' `repeat_kv` order) and its query i land on row j * q + i of KV head kv, so GQA
    becomes multi-head attention over the KV heads as they are. Only the (small) query may be copied, when its layout
    does not allow a view.
    """
    b, h, n, d = query.shape
    if h % kv_heads:
        raise ValueError(f"{h} query heads are not a multiple of {kv_heads} key/value heads.")
    return query.reshape(b, kv_heads, h // kv_heads * n, d)


def unstack_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`stack_query_heads`: `[B, Hkv, g*q, *rest]` -> `[B, H, q, *rest]` (outputs and LSEs)."""
    b, kv_heads, rows = x.shape[:3]
    return x.reshape(b, heads, rows * kv_heads // heads, *x.shape[3:])


_BIAS_ALIGN = 16  # elements; the efficient kernel refuses bias rows that do not start on aligned addresses


def stack_mask(mask: torch.Tensor, heads: int, kv_heads: int, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive `[B|1, 1|H, q|1, S]` -> `[B|1, 1|Hkv, g*q, S]` in `dtype`, rows as :func:`stack_query_heads` lays out.

    Row j * q + i of KV head kv is query i of head kv * g + j. A mask shared by all heads stays shared across the KV
    heads (one `[g*q, S]` block per batch row, to be broadcast), so it costs g*q rows rather than H*q. Every row starts
    on a 16-element boundary, as the efficient kernel needs of a bias; the padding is never read.
    """
    mb, mh, _, s = mask.shape
    groups = heads // kv_heads
    if mh == 1:
        rows = mask.expand(mb, 1, q_len, s).unsqueeze(2).expand(mb, 1, groups, q_len, s)  # [B|1, 1, g, q, S]
    elif mh == heads:
        rows = mask.expand(mb, heads, q_len, s).unflatten(1, (kv_heads, groups))  # [B|1, Hkv, g, q, S]
    else:
        raise ValueError(f"A mask over {mh} heads does not broadcast to {heads} query heads.")
    padded = -(-s // _BIAS_ALIGN) * _BIAS_ALIGN
    bias = torch.empty(*rows.shape[:2], groups * q_len, padded, dtype=dtype, device=mask.device)[..., :s]
    bias.unflatten(2, (groups, q_len)).copy_(rows)  # allocated 4D so that even a one-row bias has an aligned row stride
    return bias  # [B|1, 1|Hkv, g*q, S]


# -------------------------------------------------------------------------------------------------------- backends


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Logit soft-capping (Gemma 2): `softcap * tanh(scores / softcap)`, applied to scaled scores before the mask."""
    return scores if softcap is None else torch.tanh(scores / softcap).mul_(softcap)


def torch_attention_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention in fp32; `query [B, H, q, D]`, `key [B, Hkv, S, D]`, `value [B, Hkv, S, Dv]`, additive
    `mask [B|1, 1|H, q, S]`, optional logit soft-capping.

    Returns `(out [B, H, q, Dv], lse [B, H, q])`, fp32. The query heads sharing a KV head are stacked along the query
    axis instead of copying the KV heads, so a long prefix is never duplicated.
    """
    b, h, n, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    g = kv_groups(query, key)
    q = stack_query_heads(query.float(), hkv)  # [B, Hkv, g*q, D]
    scores = soft_cap(torch.matmul(q, key.float().transpose(-1, -2)).mul_(scale), softcap)  # [B, Hkv, g*q, S]
    if mask is not None:
        scores = scores.view(b, hkv, g, n, s)  # [B, Hkv, g, q, S]
        m = mask.float()
        scores = scores + (m.unsqueeze(2) if m.shape[1] == 1 else m.unflatten(1, (hkv, g)))
        scores = scores.view(b, hkv, g * n, s)
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, g*q]
    # A fully masked row has lse = -inf; shifting by 0 there keeps its weights at 0 instead of NaN.
    probs = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    out = torch.matmul(probs, value.float())  # [B, Hkv, g*q, D]
    return unstack_heads(out, h), unstack_heads(lse, h)


# Looked up per call (torch caches the op objects), not through functools.cache: torch.compile traces plain lookups.
def _cpu_lse_op() -> Callable | None:
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _cuda_flash_op() -> Callable | None:
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None)


def _cuda_efficient_op() -> Callable | None:
    return getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)


def _cpu_sdpa_lse(query, key, value, mask, scale) -> tuple[torch.Tensor, torch.Tensor] | None:
    op = _cpu_lse_op()
    if op is None or key.shape[2] == 0:  # the op dies with SIGFPE on zero keys
        return None
    heads, kv_heads, q_len = query.shape[1], key.shape[1], query.shape[2]
    kv_groups(query, key)  # the op accepts any head counts, silently wrong when H % Hkv != 0
    # The op handles GQA itself, but one task per query head re-reads each KV head g times; with the query heads
    # stacked (one task per KV head) the prefix is read once: 0.6-0.7x the time for 1-4 tree queries over an 8k
    # SmolLM2 prefix on 2 CPU threads, no slower from 24 on; the values differ by fp32 rounding at most.
    stacked = stack_query_heads(query, kv_heads)  # [B, Hkv, g*q, D]
    bias = None if mask is None else stack_mask(mask, heads, kv_heads, q_len, query.dtype)  # [B|1, 1|Hkv, g*q, S]
    out, lse = op(stacked, key, value, 0.0, False, attn_mask=bias, scale=scale)[:2]  # [B, Hkv, g*q, D], [B, Hkv, g*q]
    out, lse = unstack_heads(out, heads), unstack_heads(lse.float(), heads)  # [B, H, q, D], [B, H, q]
    if mask is not None:
        lse = lse.masked_fill(fully_masked_rows(mask, lse.shape), -torch.inf)
    return out.float(), lse


def _cuda_flash_lse(query, key, value, scale) -> tuple[torch.Tensor, torch.Tensor] | None:
    """torch's flash op over stacked query heads (fp16/bf16, no mask); `None` where the kernel refuses the inputs."""
    op = _cuda_flash_op()
    if op is None or query.dtype not in _HALF:
        return None
    heads, kv_heads = query.shape[1], key.shape[1]
    stacked = stack_query_heads(query, kv_heads)  # [B, Hkv, g*q, D]
    try:
        # The kernel reads K/V through their strides (last dim contiguous), so cache views go in as they are.
        out, lse = op(stacked, key, value, 0.0, False, False, scale=scale)[:2]  # [B, Hkv, g*q, D], [B, Hkv, g*q]
    except RuntimeError:  # head dims / dtypes / GPUs the kernel does not serve
        return None
    return unstack_heads(out.float(), heads), unstack_heads(lse[..., : stacked.shape[2]].float(), heads)


def _cuda_efficient_lse(query, key, value, mask, scale) -> tuple[torch.Tensor, torch.Tensor] | None:
    """torch's efficient op over stacked query heads, with a stacked mask (any float dtype); `None` if refused."""
    op = _cuda_efficient_op()
    if op is None:
        return None
    b, heads, n, _ = query.shape
    kv_heads, s = key.shape[1], key.shape[2]
    stacked = stack_query_heads(query, kv_heads)  # [B, Hkv, g*q, D]
    rows = stacked.shape[2]
    bias = empty = None
    if mask is not None:
        bias = stack_mask(mask, heads, kv_heads, n, query.dtype)  # [B|1, 1|Hkv, g*q, S]
        # From the values the kernel sees: a finite fill can overflow to -inf in fp16.
        empty = unstack_heads(torch.isneginf(bias).all(dim=-1).expand(b, kv_heads, rows), heads)  # [B, H, q]
        bias = bias.expand(b, kv_heads, rows, s)  # the kernel wants all four dims; broadcast ones keep stride 0
    try:
        out, lse = op(stacked, key, value, bias, True, 0.0, False, scale=scale)[:2]  # lse [B, Hkv, g*q rounded up]
    except RuntimeError:  # shapes / strides / head dims the kernel does not serve
        return None
    out, lse = unstack_heads(out.float(), heads), unstack_heads(lse[..., :rows].float(), heads)
    if empty is not None:
        lse = lse.masked_fill(empty, -torch.inf)
    return out, lse


def _cuda_sdpa_lse(query, key, value, mask, scale) -> tuple[torch.Tensor, torch.Tensor] | None:
    if key.shape[2] == 0:  # nothing to attend to; the plain path returns the empty part (lse = -inf)
        return None
    kv_groups(query, key)  # stacking needs H % Hkv == 0; refuse loudly rather than fall through
    if mask is None:
        result = _cuda_flash_lse(query, key, value, scale)
        if result is not None:
            return result
    return _cuda_efficient_lse(query, key, value, mask, scale)


def sdpa_lse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """torch's fused SDPA ops that also return the LSE: `(out, lse)` fp32, or `None` when none serves the inputs."""
    if query.device.type == "cpu":
        return _cpu_sdpa_lse(query, key, value, mask, scale)
    if query.device.type == "cuda":
        return _cuda_sdpa_lse(query, key, value, mask, scale)
    return None


@functools.cache
def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _flash_attn_func(required: bool = False) -> Callable | None:
    """`flash_attn.flash_attn_func`, imported lazily; `None` (or ImportError if `required`) when not importable."""
    if not required and not _flash_attn_installed():  # spare "auto" a failing import on every layer
        return None
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        if required:
            raise ImportError(_FLASH_HINT) from err
        return None
    return flash_attn_func


def flash_attention_lse(
    flash_attn_func: Callable, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn without a mask (CUDA, fp16/bf16, GQA native, native soft-capping); takes `[B, S, H, D]`, returns
    lse `[B, H, q]`."""
    out, lse = flash_attn_func(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        softmax_scale=scale, causal=False, softcap=0.0 if softcap is None else float(softcap), return_attn_probs=True,
    )[:2]
    return out.transpose(1, 2).float(), lse[..., : query.shape[2]].float()


def check_backend(backend: str) -> None:
    """Refuse unknown backend names, and an explicit "flash_attn" without the package (naming the fix)."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown tree_attn_backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend == "flash_attn":
        _FLASH_FUNC[:] = [_flash_attn_func(required=True)]


_FLASH_FUNC: list[Callable] = []  # flash_attn_func, once resolve_backend chose it (read, never imported, when traced)


@functools.cache  # per call of generate(), but the answer only depends on these
def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                    head_dim: int) -> str:
    """The prefix backend a ``generate()`` call uses, decided once, eagerly, before any (compiled) round: `backend`
    itself, or for ``"auto"`` the first of flash-attn / torch's LSE ops / plain torch that accepts inputs of this
    device, dtype and head geometry (a tiny call of each decides: a kernel that refuses inside a compiled graph could
    not fall through). Checks the name, and that flash-attn is installed when asked for by name."""
    check_backend(backend)
    if backend != "auto":
        return backend
    query = torch.zeros(1, heads, 2, head_dim, device=device, dtype=dtype)
    key = torch.zeros(1, kv_heads, 3, head_dim, device=device, dtype=dtype)
    mask = torch.zeros(1, 1, 2, 3, device=device, dtype=dtype)
    flash = _flash_attn_func() if device.type == "cuda" and dtype in _HALF else None
    if flash is not None and _serves(lambda: flash_attention_lse(flash, query, key, key, 1.0)):
        _FLASH_FUNC[:] = [flash]
        return "flash_attn"
    if _serves(lambda: sdpa_lse_attention(query, key, key, None, 1.0)) and _serves(
            lambda: sdpa_lse_attention(query, key, key, mask, 1.0)):
        return "sdpa_lse"
    return "torch"


def _serves(call: Callable) -> bool:
    try:
        return call() is not None
    except RuntimeError:
        return False


def prefix_attention_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    backend: str = "auto",
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the tree queries over the prefix keys with its LSE: `(out [B, H, q, Dv], lse [B, H, q])`, fp32.

    `backend` is assumed checked (:func:`check_backend`); a backend that cannot serve the inputs falls through.
    Soft-capped scores are served by flash-attn (native) and the torch path; torch's fused ops cannot cap them.
    Keys and values of different head dims (multi-head latent attention) go to the torch path.
    """
    same_dims = key.shape[-1] == value.shape[-1]
    if backend in ("auto", "flash_attn") and mask is None and query.is_cuda and query.dtype in _HALF and same_dims:
        # Resolved by resolve_backend (the loop's case: nothing to look up or import here), or looked up now.
        flash = _FLASH_FUNC[0] if backend == "flash_attn" and _FLASH_FUNC else _flash_attn_func()
        if flash is not None and key.shape[2] > 0:
            try:
                return flash_attention_lse(flash, query, key, value, scale, softcap)
            except RuntimeError:  # head dims / GPUs the package does not serve: fall through as the other kernels do
                pass
    if backend != "torch" and softcap is None and same_dims:
        result = sdpa_lse_attention(query, key, value, mask, scale)
        if result is not None:
            return result
    return torch_attention_lse(query, key, value, mask, scale, softcap)


def add_sink(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention sinks (gpt-oss's ``s_aux``): a learned logit per head that joins every row's softmax denominator and
    carries no value. It is one more part of the LSE merge: lse = `sinks[h]`, output 0.

    `out [B, H, q, Dv]`, `lse [B, H, q]`, `sinks [H]` -> the same shapes, fp32.
    """
    sink_lse = sinks.float().view(1, -1, 1).expand_as(lse)  # [B, H, q]
    total = torch.logaddexp(lse, sink_lse)
    return out * torch.exp(lse - total)[..., None], total


def merge_attention_states(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint key sets, in fp32.

    `o: [B, H, q, D]`, `lse: [B, H, q]`; returns `(out [B, H, q, D], lse [B, H, q])` over the union of the keys. A part
    with lse = -inf (no visible key) gets weight 0 even if its output is NaN; a row empty in both parts gives 0.
    """
    lse1, lse2 = lse1.float(), lse2.float()
    lse = torch.logaddexp(lse1, lse2)  # [B, H, q]
    w1 = torch.exp(lse1 - lse)[..., None]  # NaN only where both parts are empty; `w > 0` is False there
    w2 = torch.exp(lse2 - lse)[..., None]
    out = torch.where(w1 > 0, o1.float() * w1, 0.0) + torch.where(w2 > 0, o2.float() * w2, 0.0)
    return out, lse


# ----------------------------------------------------------------------------------------- the attention function


# Keywords that reach an attention function without changing its result here: what the model forwards from its own
# call, outputs the tree path does not produce (attention weights), and packed-sequence metadata that is None unless
# sequences are packed. Anything else that is not None is refused (see check_attention_inputs).
IGNORED_INPUTS = frozenset({
    "position_ids", "use_cache", "output_attentions", "output_hidden_states", "return_dict", "cache_position",
    "cache", "past_key_values", "layer_idx", "token_type_ids", "logits_to_keep", "output_router_logits",
})
# Inputs implemented here, named for the error message of a family that passes something else.
IMPLEMENTED_INPUTS = ("scaling", "dropout", "sliding_window", "softcap", "s_aux", "is_causal")


def check_attention_inputs(module, kwargs: dict, is_causal: bool | None) -> None:
    """Refuse an attention input the tree path would otherwise drop, naming the family and the input."""
    unknown = sorted(name for name, value in kwargs.items() if value is not None and name not in IGNORED_INPUTS)
    if is_causal is False:
        unknown.append("is_causal=False")
    if unknown:
        family = type(module).__module__.rsplit(".", 1)[-1].removeprefix("modeling_")
        raise UnsupportedTargetError(
            f"{family} passes {', '.join(map(repr, unknown))} to its attention function, which LongSpec's tree "
            f"verification does not implement (it implements {', '.join(IMPLEMENTED_INPUTS)}); its output would "
            "differ from plain generate(), so this model cannot be used with a LongSpec draft."
        )


def user_attention_function(module) -> Callable | None:
    """The attention function the user chose for `module`'s model, while a verification (in another thread) has
    switched its shared config to the hybrid one; None outside such a switch or for this function's own name."""

    config = getattr(module, "config", None)
    name = None if config is None else user_attention_implementation(config)
    if name is None or name == HYBRID_ATTENTION_NAME:
        return None
    if name == "eager":  # not in the registry: each family has its own, next to its attention module
        return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return AttentionInterface._global_mapping.get(name)


def _dense_fallback(module, query, key, value, attention_mask, dropout, scaling, softcap, s_aux,
                    kwargs) -> tuple[torch.Tensor, None]:
    own = user_attention_function(module)
    if own is not None:  # a plain forward in another thread than a verification: exactly what it would run
        options = {"softcap": softcap, "s_aux": s_aux}
        return own(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs,
                   **{k: v for k, v in options.items() if v is not None})
    if softcap is not None or s_aux is not None:
        # transformers' SDPA cannot cap logits or add sinks: exact dense attention on the plain path instead.
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out, lse = torch_attention_lse(query, key, value, as_additive_mask(attention_mask, query.dtype), scale, softcap)
        if s_aux is not None:
            out, lse = add_sink(out, lse, s_aux)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None
    # sdpa_attention_forward learns GQA from the module only; expand here when the module does not say.
    if query.shape[1] != key.shape[1] and getattr(module, "num_key_value_groups", 1) == 1:
        key, value = repeat_kv_heads(key, query.shape[1]), repeat_kv_heads(value, query.shape[1])
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def layer_index(module) -> int:
    index = getattr(module, "layer_idx", None)
    if index is None:
        raise ValueError(f"{type(module).__name__} has no layer_idx, which SpecPV partial verification needs; "
                         "disable generation_config.specpv for this model.")
    return int(index)


def hybrid_tree_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    is_causal: bool | None = None,
    tree_prefix_len: int | None = None,
    tree_prefix_masked: bool = False,
    tree_window_keys: int | None = None,
    tree_attn_backend: str = "auto",
    tree_partial=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`AttentionInterface` function: `query [B, H, q, D]`, `key [B, Hkv, P + q, D]`, `value [B, Hkv, P + q, Dv]`,
    additive `attention_mask [B, 1, q, P + q]`, `[B, 1, q, q]` (every prefix key visible) or None; returns
    `(out [B, q, H, Dv] contiguous, None)`.

    Args:
        tree_prefix_len: P, the committed keys before the `q` tree keys; marks a verification forward. Without it
            this is transformers' SDPA attention (exact dense attention, dropout included).
        tree_prefix_masked: the prefix holds padding / placeholder slots, so its part of the mask must be applied.
        sliding_window: the layer's window (the mask applies it; SpecPV's partial reads skip sliding layers).
        tree_window_keys: M, for sliding layers: only the last M prefix keys can be visible, and their mask covers
            just those (`[B, 1, q, M + q]`), so the layer reads O(window) keys whatever the context.

    The caller gives the mask prefix columns only where they hide something (padding, placeholders, a window).
        softcap: logit soft-capping (Gemma 2), applied to both parts before their LSEs.
        s_aux: `[H]` attention-sink logits (gpt-oss), one more term of every row's softmax denominator.
        tree_attn_backend: "auto" | "flash_attn" | "sdpa_lse" | "torch", for the prefix part.
        tree_partial: SpecPV state (:class:`~longspec_hf.specpv.PartialKV`): in a partial round the prefix part
            reads only the retrieved KV and the recent tail; in a refresh round it also chooses what to retrieve.

    `dropout` is ignored on the tree path (verification is inference). Any other input that is not None and could
    change the result is refused (:func:`check_attention_inputs`), never dropped.
    """
    record_probe_call(tree_prefix_len is not None)
    if tree_prefix_len is None:
        return _dense_fallback(module, query, key, value, attention_mask, dropout, scaling, softcap, s_aux,
                               {**kwargs, "is_causal": is_causal})
    check_attention_inputs(module, kwargs, is_causal)
    if tree_attn_backend not in BACKENDS or (tree_attn_backend == "flash_attn" and not _FLASH_FUNC):
        check_backend(tree_attn_backend)  # the name's error; flash-attn imported once
    prefix_len, q_len = int(tree_prefix_len), query.shape[2]
    if key.shape[2] != prefix_len + q_len:
        raise ValueError(
            f"tree_prefix_len={prefix_len} with {q_len} tree queries needs {prefix_len + q_len} keys, "
            f"got {key.shape[2]}."
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    mask = as_additive_mask(attention_mask, query.dtype)  # [B, 1, q, P + q] or None

    tree_mask = None if mask is None else mask[..., -q_len:]  # [B, 1, q, q]
    out, lse = torch_attention_lse(query, key[:, :, prefix_len:], value[:, :, prefix_len:], tree_mask, scale, softcap)
    # The mask's prefix columns say what the layer reads, whatever the family passes as `sliding_window` (some
    # apply their window through the mask alone): none (every committed key visible), all P, or the last
    # `tree_window_keys` (a sliding layer: keys before them are invisible to every tree query and never read).
    columns = 0 if mask is None else mask.shape[-1] - q_len
    if columns not in (0, prefix_len, tree_window_keys):
        raise ValueError(f"A verification mask over {columns} prefix keys fits neither the {prefix_len} committed "
                         f"keys nor tree_window_keys={tree_window_keys}.")
    start = prefix_len - columns if columns else 0
    if prefix_len > start:
        prefix_mask = mask[..., :-q_len] if columns else None
        prefix_k, prefix_v = key[:, :, start:prefix_len], value[:, :, start:prefix_len]
        # SpecPV applies to full-attention layers only; sliding layers already read a bounded prefix.
        sliding = sliding_window is not None or start > 0
        partial = tree_partial if tree_partial is not None and not sliding else None
        if partial is not None and partial.mode == "partial":
            o1, lse1 = partial.attention(layer_index(module), query, prefix_k, prefix_v, scale, tree_attn_backend,
                                         softcap)
        else:
            o1, lse1 = prefix_attention_lse(query, prefix_k, prefix_v, prefix_mask, scale, tree_attn_backend, softcap)
            if partial is not None:
                partial.refresh(layer_index(module), query, prefix_k, prefix_v)
        out, lse = merge_attention_states(o1, lse1, out, lse)
    if s_aux is not None:
        out, lse = add_sink(out, lse, s_aux)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None  # [B, q, H, Dv]


# ------------------------------------------------------------------------------------------------- registration


def register_hybrid_attention() -> None:
    """Register :func:`hybrid_tree_attention` under :data:`HYBRID_ATTENTION_NAME` (idempotent).

    The eager mask function is registered for the name too: a forward that builds its masks while a verification
    has switched the shared config (another thread's) gets a materialised additive mask, which every attention
    function reads correctly (SDPA's may be None, meaning "causal", which an eager function would not apply).
    """
    AttentionInterface.register(HYBRID_ATTENTION_NAME, hybrid_tree_attention)
    AttentionMaskInterface.register(HYBRID_ATTENTION_NAME, eager_mask)


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Prefix backends that work in this process on `device` (default: CUDA if available, else CPU), best first.

    "auto" is not listed: it picks the first of these that serves the inputs.
    """
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = kind == "cuda" and torch.cuda.is_available()
    backends = []
    if cuda and _flash_attn_installed():
        backends.append("flash_attn")
    cuda_ops = cuda and (_cuda_flash_op() is not None or _cuda_efficient_op() is not None)
    if (kind == "cpu" and _cpu_lse_op() is not None) or cuda_ops:
        backends.append("sdpa_lse")
    return [*backends, "torch"]
