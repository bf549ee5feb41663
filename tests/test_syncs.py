"""Host synchronisations per round: one (the acceptance's transfer), whatever the drafter and tree.

On an accelerator every read of a device value by the host (``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``,
``nonzero``, ``.cpu()``, an explicit synchronize) waits for all queued work, so a round that reads several times
cannot keep the device busy. CPU tensors behave the same way in the loop's code, so a torch-function mode that counts
these reads on CPU counts the syncs a GPU round would make. The per-round figure is the difference between two
calls of different lengths on the same prompt (the prefill's one-off checks cancel out).
"""

from __future__ import annotations

import pytest
import torch
from conftest import GPU_LIKE, random_prompt, tiny_target
from test_batch import left_padded
from torch.overrides import TorchFunctionMode

import longspec_hf.auto_tree as auto_tree
from longspec_hf import LongSpecDraftModel, SelfDraft

READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
    torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero,
    torch.Tensor.unique, torch.unique, torch.masked_select, torch.Tensor.masked_select,
}


class HostReads(TorchFunctionMode):
    """Counts the torch calls that make the host wait for a device value."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.count += 1
        elif func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in _indices(args[1])):
            self.count += 1  # boolean-mask indexing: the result's size depends on the mask's content
        return func(*args, **(kwargs or {}))


def _indices(index):
    return index if isinstance(index, tuple) else (index,)


def reads_per_round(monkeypatch, generate, drafter) -> float:
    """Host reads per round, from two calls of different lengths; the auto tree's per-level choices (one read each,
    counted by wrapping the choice) are left out and checked separately."""
    choices = {"calls": 0, "reads": 0}
    mode = HostReads()
    original_choose = auto_tree.AutoTree.choose

    def choose(self, *args, **kwargs):
        before = mode.count
        out = original_choose(self, *args, **kwargs)
        choices["calls"] += 1
        choices["reads"] += mode.count - before
        return out

    monkeypatch.setattr(auto_tree.AutoTree, "choose", choose)
    monkeypatch.setattr(auto_tree, "synchronize", lambda device: setattr(mode, "count", mode.count + 1))
    generate(8)  # warm-up: the auto tree's first use measures this device
    figures = []
    for new_tokens in (8, 30):
        choices.update(calls=0, reads=0)
        mode.count = 0
        with mode:
            generate(new_tokens)
        assert choices["reads"] == choices["calls"]  # one read per level the auto tree chose a width for
        figures.append((mode.count - choices["reads"], drafter.stats.rounds))
    (short_reads, short_rounds), (long_reads, long_rounds) = figures
    assert long_rounds > short_rounds
    return (long_reads - short_reads) / (long_rounds - short_rounds)


def longspec_draft(target, tree_shape):
    torch.manual_seed(0)
    draft = LongSpecDraftModel.from_target(target, sink_size=4, window_size=8)  # the window overflows: eviction
    draft.generation_config.tree_shape = tree_shape
    return draft


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
@pytest.mark.parametrize("tree_shape", [[1, 1, 1], [2, 3], "auto"])
@pytest.mark.parametrize("kind", ["longspec", "self_draft"])
def test_one_host_read_per_round(monkeypatch, device_costs, family, tree_shape, kind):
    device_costs(**GPU_LIKE)
    target = tiny_target(family)
    if kind == "longspec":
        drafter = longspec_draft(target, tree_shape)
    else:
        drafter = SelfDraft.from_target(target, sink_size=2, window_size=8, tree_shape=tree_shape)
    ids = random_prompt(40, seed=1)

    def generate(n):
        return target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=n)

    assert reads_per_round(monkeypatch, generate, drafter) == 1
    if tree_shape == "auto":
        assert any(name != "none" for name in drafter.stats.tree_shapes)  # the per-level choices were exercised


@pytest.mark.parametrize("case", ["lookup", "padded", "specpv", "lookup_auto"])
def test_one_host_read_per_round_with_branches_padding_and_specpv(monkeypatch, device_costs, case):
    device_costs(**GPU_LIKE)
    target = tiny_target("llama")
    draft = longspec_draft(target, "auto" if case == "lookup_auto" else [2, 2])
    kwargs = {"input_ids": random_prompt(40, seed=1)}
    if case.startswith("lookup"):
        kwargs["prompt_lookup_num_tokens"] = 3
    elif case == "padded":
        kwargs["input_ids"], kwargs["attention_mask"] = left_padded([random_prompt(n, seed=n) for n in (9, 30)])
    else:
        draft.generation_config.specpv = {"block_size": 4, "sink_blocks": 1, "retrieval_blocks": 2,
                                          "window_blocks": 2, "refresh_interval": 5}

    def generate(n):
        return target.generate(**kwargs, assistant_model=draft, do_sample=False, max_new_tokens=n)

    assert reads_per_round(monkeypatch, generate, draft) == 1
