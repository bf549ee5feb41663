"""KV caches of the speculative loop: the target's preallocated cache and the draft's constant-size *sink + window* one.

**Target** (:class:`PreallocatedCache`): transformers' `DynamicCache` concatenates every new token onto the whole KV
of every layer (`torch.cat`: O(context) bytes copied per forward), and `StaticCache` attends over its full
preallocated length under a mask, which keeps SDPA off its fast unmasked kernels. A speculative round appends a tree,
keeps its accepted path and drops the rest, so it needs neither: :class:`PreallocatedLayer` writes new KV by index
into a buffer reserved for the whole generation and hands attention a view of the filled prefix only. Compaction moves
accepted slots in place and cropping just shortens the view: no O(context) work per round outside attention.

**Draft** (:class:`SinkWindowCache`):

The draft's self-attention only ever needs the first ``sink_size`` tokens (attention sinks) and the most recent
``window_size`` tokens (the draft sizes that window to what its window rule reaches: its configured window, plus the
widest tree level under LongSpec's own tree rule), so everything in between is evicted and the draft's memory does not
grow with the context.

Two things make it usable for speculative decoding:

* the cache reports the **absolute** number of tokens it has seen (``get_seq_length``), so RoPE positions and the
  decode loop's bookkeeping stay right after eviction;
* a speculative section: between :meth:`SinkWindowCache.begin_speculation` and
  :meth:`SinkWindowCache.end_speculation` nothing is evicted, so the tokens of a draft tree can be appended level by
  level and then either dropped or partly kept (the accepted path) by index.

Outside a speculative section the cache behaves like a streaming cache: ``update`` returns all the states the current
forward needs, then trims what it stores back to ``sink + window``.
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A full-attention layer whose keys/values live in a buffer `[B, Hkv, capacity, D]` written by index.

    ``keys`` / ``values`` are views of the first ``length`` slots, so everything that reads a `DynamicLayer` (model
    forwards, masks, the draft's cross-attention, compaction by index) works unchanged, and writes through those views
    land in the buffer. The buffer grows geometrically when a generation outlives its reservation (rare: the loop
    reserves prompt + new tokens + one tree), so appends cost O(new tokens), amortised.
    """

    def __init__(self, reserve: int = 0, **kwargs):
        self.reserve = reserve
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self.length = 0
        super().__init__(**kwargs)

    # Assigning keys/values (transformers' own layer methods do) replaces the buffer by the given tensor.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._key_buffer is None else self._key_buffer[:, :, : self.length]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._key_buffer = value
        self.length = 0 if value is None or value.dim() < 3 else value.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._value_buffer is None else self._value_buffer[:, :, : self.length]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._value_buffer = value

    @property
    def capacity(self) -> int:
        return 0 if self._key_buffer is None or self._key_buffer.dim() < 3 else self._key_buffer.shape[-2]

    def _reserve(self, key_like: torch.Tensor, value_like: torch.Tensor, slots: int) -> None:
        """Make room for `slots` slots in total, keeping the filled ones."""
        if slots <= self.capacity:
            return
        # Geometric growth keeps appends amortised O(new tokens); 1.25x rather than 2x because at long context a
        # doubled buffer is gigabytes of idle memory.
        capacity = max(slots, self.capacity * 5 // 4, self.reserve)
        b, h, _, d = key_like.shape
        keys = key_like.new_empty(b, h, capacity, d)  # [B, Hkv, capacity, D]
        # Values may be narrower than keys (multi-head latent attention) and have their own head count.
        values = value_like.new_empty(*value_like.shape[:2], capacity, value_like.shape[-1])  # [B, Hkv', capacity, Dv]
        if self.length:
            keys[:, :, : self.length] = self.keys
            values[:, :, : self.length] = self.values
        length = self.length
        self._key_buffer, self._value_buffer, self.length = keys, values, length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.device, self.is_initialized = key_states.device, True
        start, end = self.length, self.length + key_states.shape[-2]
        self._reserve(key_states, value_states, end)
        self._key_buffer[:, :, start:end] = key_states
        self._value_buffer[:, :, start:end] = value_states
        self.length = end
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` slots (a negative count, as transformers' `crop`); O(1)."""
        if tokens_to_remove > 0:
            raise ValueError("PreallocatedLayer.crop takes a negative number of tokens to remove.")
        self.length = max(self.length + tokens_to_remove, 0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._key_buffer is not None and self._key_buffer.dim() == 4:
            length = self.length
            self._key_buffer = self._key_buffer[indices]
            self._value_buffer = self._value_buffer[indices]
            self.length = length

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        self.length = 0
        self.is_initialized = False


class PreallocatedCache(DynamicCache):
    """The target's cache in the speculative loop: a `DynamicCache` of :class:`PreallocatedLayer` s, each reserving
    ``reserve`` slots at its first update. Full-attention layers only (the tree mask applies sliding windows)."""

    def __init__(self, reserve: int = 0):
        Cache.__init__(self, layer_class_to_replicate=functools.partial(PreallocatedLayer, reserve=reserve))

    @classmethod
    def from_dynamic(cls, cache: DynamicCache, reserve: int = 0) -> PreallocatedCache:
        """A copy of a filled `DynamicCache` (a caller's prompt cache) with room for ``reserve`` slots per layer."""
        out = cls(reserve)
        for layer in cache.layers:
            new = PreallocatedLayer(reserve=reserve)
            if layer.is_initialized and layer.keys is not None and layer.keys.numel():
                new.update(layer.keys, layer.values)
            out.layers.append(new)
        return out

    def write_to(self, cache: DynamicCache) -> DynamicCache:
        """Leave the filled KV in a plain `DynamicCache` (views, no copy), as plain decoding leaves its cache."""
        for i, layer in enumerate(self.layers):
            if i == len(cache.layers):
                cache.layers.append(DynamicLayer())
            target = cache.layers[i]
            if not target.is_initialized and layer.is_initialized:
                target.lazy_initialization(layer.keys, layer.values)
            target.keys, target.values = layer.keys, layer.values
        return cache


def sink_window_slots(valid: torch.Tensor, sink: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which entries a sink+window cache keeps, per row, right-aligned.

    Args:
        valid: `[B, S]` bool, which stored entries hold a real token (rows may have padding or holes).
        sink, window: keep the first `sink` and the last `window` valid entries of each row.

    Returns:
        `(src [B, C], kept [B, C])`: source index of each kept entry, rows right-aligned to the common length
        `C = min(S, sink + window)` (left slots of rows with fewer entries are padding: `kept` False, `src` 0).
        `C` is known on the host, so eviction never waits for the device (it runs every round).
    """
    b, s = valid.shape
    rank = valid.cumsum(-1) - 1  # [B, S] rank of each valid entry
    count = valid.sum(-1, keepdim=True)  # [B, 1]
    keep = valid & ((rank < sink) | (rank >= count - window))
    length = min(s, sink + window)  # a row keeps min(count, sink + window) <= length entries
    dst = length - keep.sum(-1, keepdim=True) + keep.cumsum(-1) - 1  # [B, S] destination of each kept entry
    dst = torch.where(keep, dst, length)  # entries not kept land in a spare last column, dropped below
    columns = torch.arange(s, device=valid.device).expand(b, s)
    src = valid.new_zeros(b, length + 1, dtype=torch.long).scatter_(1, dst, columns)[:, :length]
    kept = valid.new_zeros(b, length + 1).scatter_(1, dst, keep)[:, :length]
    return src, kept


def gather_slots(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """`x [B, H, S, D]`, `src [B, C]` -> `[B, H, C, D]`."""
    b, h, _, d = x.shape
    return x.gather(2, src[:, None, :, None].expand(b, h, src.shape[1], d))


class SinkWindowLayer(DynamicLayer):
    """One layer of a :class:`SinkWindowCache`; stores ``keys``/``values`` as ``[B, H, S, D]``.

    ``S <= sink_size + window_size`` outside a speculative section, plus the speculative tokens inside one. In a
    batch, rows can hold different numbers of real tokens (left padding, different acceptance lengths): ``valid``
    (`[B, S]` bool, ``None`` when every entry is real) says which entries attention must see; rows are kept
    right-aligned so the newest tokens of every row share the last slots.
    """

    is_sliding = True

    def __init__(self, sink_size: int, window_size: int, **kwargs):
        super().__init__()
        if sink_size < 0 or window_size < 1:
            raise ValueError(
                f"SinkWindowCache needs sink_size >= 0 and window_size >= 1, got {sink_size}, {window_size}."
            )
        self.sink_size = sink_size
        self.window_size = window_size
        self.valid: torch.Tensor | None = None
        self.cumulative_length = 0  # slots ever appended (the absolute length for an unpadded row)
        self.num_speculative = 0  # trailing stored tokens that may still be rolled back
        self.speculating = False

    @property
    def capacity(self) -> int:
        return self.sink_size + self.window_size

    def _append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None) -> None:
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        stored = self.get_stored_length()
        if valid is not None and self.valid is None:
            self.valid = torch.ones(keys.shape[0], stored, dtype=torch.bool, device=keys.device)
        if self.valid is not None:
            new = valid if valid is not None else torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool,
                                                             device=keys.device)
            self.valid = torch.cat([self.valid, new], dim=-1)
        self.keys = torch.cat([self.keys, keys], dim=-2)  # [B, H, S + q, D]
        self.values = torch.cat([self.values, values], dim=-2)
        self.cumulative_length += keys.shape[-2]

    def _evict(self) -> None:
        """Keep the sink and window tokens of each row's committed part; speculative tokens stay."""
        committed = self.get_stored_length() - self.num_speculative
        if self.valid is None and committed <= self.capacity:
            return
        valid = self.valid[:, :committed] if self.valid is not None else torch.ones(
            self.keys.shape[0], committed, dtype=torch.bool, device=self.keys.device)
        src, kept = sink_window_slots(valid, self.sink_size, self.window_size)
        spec = slice(committed, None)
        self.keys = torch.cat([gather_slots(self.keys[:, :, :committed], src), self.keys[:, :, spec]], dim=-2)
        self.values = torch.cat([gather_slots(self.values[:, :, :committed], src), self.values[:, :, spec]], dim=-2)
        if self.valid is not None:  # kept while the batch is padded (telling would need to read the device)
            self.valid = torch.cat([kept, self.valid[:, spec]], dim=-1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._append(key_states, value_states, None)
        full_keys, full_values = self.keys, self.values
        if self.speculating:
            self.num_speculative += key_states.shape[-2]
        else:
            self._evict()
        return full_keys, full_values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_stored_length(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Stored index i maps to absolute position i + offset for the window part; the sinks map to smaller
        # positions than their true ones, which keeps them (correctly) visible to every causal query.
        stored = self.get_stored_length()
        return stored + query_length, self.cumulative_length - stored

    def get_max_length(self) -> int:
        return self.capacity

    def crop(self, tokens_to_remove: int) -> None:
        """Roll back the newest ``-tokens_to_remove`` speculative tokens (a negative count, as in transformers)."""
        if tokens_to_remove > 0:
            raise ValueError("SinkWindowCache.crop takes a negative number of tokens to remove.")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        if n > self.num_speculative:
            raise ValueError(
                f"Cannot roll back {n} tokens: only {self.num_speculative} are speculative, older ones may be evicted. "
                "Wrap speculative appends in begin_speculation()/end_speculation()."
            )
        self.keys = self.keys[..., :-n, :]
        self.values = self.values[..., :-n, :]
        if self.valid is not None:
            self.valid = self.valid[:, :-n]
        self.cumulative_length -= n
        self.num_speculative -= n

    def end_speculation(self, keep: torch.Tensor | None) -> None:
        """Keep the speculative tokens at positions ``keep`` (indices into the speculative part, increasing, the
        same for every row), drop the others, and evict down to ``sink + window``."""
        if self.is_initialized and self.num_speculative:
            committed = self.get_stored_length() - self.num_speculative
            idx = torch.arange(committed, device=self.keys.device)
            if keep is not None and keep.numel():
                idx = torch.cat([idx, keep.to(self.keys.device) + committed])
            self.keys = self.keys.index_select(-2, idx)
            self.values = self.values.index_select(-2, idx)
            if self.valid is not None:
                self.valid = self.valid.index_select(-1, idx)
            kept = 0 if keep is None else keep.numel()
            self.cumulative_length -= self.num_speculative - kept
        self.num_speculative = 0
        self.speculating = False
        if self.is_initialized:
            self._evict()

    def commit(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Drop every speculative token, append `keys/values [B, H, a, D]` (entries where `valid [B, a]` is False
        are placeholders of rows that committed fewer tokens), and evict per row."""
        self.end_speculation(None)
        self._append(keys, values, valid)
        self._evict()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.valid is not None:
            self.valid = self.valid[indices]

    def reset(self) -> None:
        super().reset()
        self.valid = None
        self.cumulative_length = 0
        self.num_speculative = 0
        self.speculating = False


class SinkWindowCache(DynamicCache):
    """A :class:`~transformers.DynamicCache` whose layers keep only ``sink_size`` first and ``window_size`` last tokens.

    Memory is ``O(sink_size + window_size)`` per layer whatever the context length, while ``get_seq_length()`` stays
    the absolute length. Example::

        cache = SinkWindowCache(sink_size=4, window_size=512, num_layers=1)
        cache.update(k, v, 0)              # streaming: trims to 4 + 512 after the call
        cache.begin_speculation()
        cache.update(k_tree, v_tree, 0)    # kept until end_speculation
        cache.end_speculation(keep=torch.tensor([0, 2]))
    """

    def __init__(self, sink_size: int = 4, window_size: int = 512, num_layers: int = 1):
        self.sink_size = sink_size
        self.window_size = window_size
        Cache.__init__(self, layers=[SinkWindowLayer(sink_size, window_size) for _ in range(num_layers)])

    def begin_speculation(self) -> None:
        for layer in self.layers:
            layer.speculating = True

    def end_speculation(self, keep: torch.Tensor | None = None) -> None:
        for layer in self.layers:
            layer.end_speculation(keep)

    def commit(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Single-layer caches only (the draft's): see :meth:`SinkWindowLayer.commit`."""
        self.layers[0].commit(keys, values, valid)

    @property
    def num_speculative(self) -> int:
        return self.layers[0].num_speculative

    def get_stored_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_stored_length()

    def nbytes(self) -> int:
        """Bytes held by the stored key/value tensors (all layers)."""
        return kv_bytes(self)


def kv_bytes(cache, layers: int | None = None) -> int:
    """Bytes of the key/value tensors held by any transformers Cache (only its first `layers` layers if given)."""
    total = 0
    for layer in list(getattr(cache, "layers", []))[:layers]:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
