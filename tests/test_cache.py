"""SinkWindowCache: constant memory, absolute length, speculative append + rollback."""

from __future__ import annotations

import torch

from longspec_hf import SinkWindowCache


def kv(n, start=0, heads=2, dim=8):
    # Each entry carries its absolute position, so tests can see exactly which tokens were kept.
    pos = torch.arange(start, start + n, dtype=torch.float32)
    t = pos.view(1, 1, n, 1).expand(1, heads, n, dim).clone()
    return t, t.clone()


def stored_positions(cache):
    return cache.layers[0].keys[0, 0, :, 0].long().tolist()


def feed(cache, total, chunk=64):
    for start in range(0, total, chunk):
        cache.update(*kv(min(chunk, total - start), start), 0)


def test_memory_is_constant_in_context_length():
    short, long = SinkWindowCache(4, 64), SinkWindowCache(4, 64)
    feed(short, 1024)
    feed(long, 8192)
    assert short.nbytes() == long.nbytes() > 0
    assert short.get_seq_length() == 1024 and long.get_seq_length() == 8192
    assert stored_positions(long) == list(range(4)) + list(range(8192 - 64, 8192))


def test_update_returns_everything_the_forward_needs():
    cache = SinkWindowCache(2, 4)
    feed(cache, 10)
    keys, _ = cache.update(*kv(3, 10), 0)
    assert keys[0, 0, :, 0].long().tolist() == [0, 1, 6, 7, 8, 9, 10, 11, 12]
    assert stored_positions(cache) == [0, 1, 9, 10, 11, 12]


def test_speculation_keeps_tokens_until_committed():
    cache = SinkWindowCache(2, 4)
    feed(cache, 10)
    cache.begin_speculation()
    cache.update(*kv(3, 10), 0)
    cache.update(*kv(5, 13), 0)
    assert cache.num_speculative == 8 and cache.get_seq_length() == 18
    assert len(stored_positions(cache)) == 6 + 8  # nothing evicted while speculating
    cache.end_speculation(keep=torch.tensor([0, 2, 5]))
    assert cache.get_seq_length() == 13
    assert stored_positions(cache) == [0, 1, 9, 10, 12, 15]  # sink + the last 4 committed


def test_rollback_and_full_rejection():
    cache = SinkWindowCache(2, 4)
    feed(cache, 10)
    before = stored_positions(cache)
    cache.begin_speculation()
    cache.update(*kv(4, 10), 0)
    cache.crop(-2)
    assert cache.get_seq_length() == 12
    cache.end_speculation(None)
    assert stored_positions(cache) == before and cache.get_seq_length() == 10


def test_rollback_past_evicted_tokens_is_refused():
    cache = SinkWindowCache(2, 4)
    feed(cache, 10)
    try:
        cache.crop(-1)
    except ValueError as err:
        assert "speculative" in str(err)
    else:
        raise AssertionError("crop past the speculative part must fail")


def test_mask_sizes_report_stored_length_and_offset():
    cache = SinkWindowCache(4, 16)
    feed(cache, 100)
    kv_len, offset = cache.get_mask_sizes(3, 0)
    assert kv_len == 20 + 3 and offset == 100 - 20
