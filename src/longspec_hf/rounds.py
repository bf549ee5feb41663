"""How features take part in the decode loop's rounds: a :class:`Round` record and :class:`RoundHook` s.

The loop (:func:`~longspec_hf.generation.speculative_generate`) runs the same steps every round — plan, draft,
verify, accept, commit, emit — and knows no feature by name. A feature is a hook that reads the round at each step
and may fill in what the step leaves open: the tree's shape (a fixed shape, or ``tree_shape="auto"`` level by level),
an extra branch to graft (prompt lookup), whether the verification read the whole prefix (SpecPV), statistics.
Hooks run in list order at each step, like transformers' logits processors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .tree import DraftTree, TreeGrowth


@dataclass
class Round:
    """One round, filled in step by step (`A` active rows, `T` tree nodes).

    Attributes:
        rows: the batch rows still generating, `A` of them (indices into the call's batch).
        context: committed slots of the target's cache.
        room: tokens any row may still produce after its root (the tree is no deeper).
        shape: the draft's tree: level widths, or a :class:`~longspec_hf.tree.TreeGrowth` that chooses each level.
        branch: `[A, L]` tokens to graft onto every row's tree after drafting, or None.
        tree: the tree verified; its first `drafted` nodes are the draft's own.
        full: whether the verification read the whole prefix (False only in SpecPV's partial rounds).
        paths: per row, the accepted nodes (tree indices, root excluded).
        new_tokens: per row, the target's tokens along the path and the bonus token.
        committed: `[A, 1 + max_k]` each row's root and accepted tokens (the draft commits them).
    """

    rows: list[int]
    context: int
    room: int
    shape: tuple[int, ...] | TreeGrowth = ()
    branch: torch.Tensor | None = None
    tree: DraftTree | None = None
    drafted: int = 0
    full: bool = True
    paths: list[list[int]] = field(default_factory=list)
    new_tokens: list[list[int]] = field(default_factory=list)
    committed: torch.Tensor | None = None


class RoundHook:
    """A feature's part in every round; each step does nothing unless overridden."""

    def plan(self, round: Round) -> None:
        """Before drafting: set the round's `shape` and `branch`."""

    def drafted(self, round: Round) -> None:
        """After drafting: may extend `round.tree`."""

    def accepted(self, round: Round) -> None:
        """After acceptance (whose host transfer waited for the verification)."""

    def committed(self, round: Round) -> None:
        """After the target's cache and the draft kept the accepted path."""

    def emitted(self, round: Round, row: int, tokens: list[int]) -> None:
        """Row `round.rows[row]` appended `tokens` (fewer than its new tokens when a stopping criterion fired)."""

    def select_rows(self, rows: torch.Tensor) -> None:
        """Only the rows at these positions of the active ones go on (the others finished)."""

    def finish(self) -> None:
        """After the last round."""


class RoundHooks(list):
    """Hooks called in order at each step (``hooks.plan(round)`` calls every hook's ``plan``)."""

    def __getattr__(self, step: str):
        if step.startswith("_") or not hasattr(RoundHook, step):
            raise AttributeError(step)

        def run(*args) -> None:
            for hook in self:
                getattr(hook, step)(*args)

        return run


class FixedShape(RoundHook):
    """The draft's fixed level widths, cut to the tokens the rows may still produce."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)

    def plan(self, round: Round) -> None:
        round.shape = self.shape[: max(round.room, 0)]
