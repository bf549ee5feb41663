"""How likely the target is to accept a draft token, from the draft's own confidence (for ``tree_shape="auto"``).

EAGLE-2's observation: a draft's probability of a token predicts whether the target accepts it. The model here is
a calibration of that probability, learned online from the rounds of the current call:

* ``h(q, rank)``: the probability that the target's next token is a drafted child whose conditional draft
  probability is `q`, given that its parent was accepted. Binned on `q`, starting from the prior ``h(q) = q`` (worth a
  few observations per bin) and made non-decreasing (a more confident token is never predicted to be accepted less).
  Kept apart for a parent's most likely child (rank 0) and its other children: the same `q` means different things
  for them (a top child at q = 0.2 tops a flat distribution; a second child at 0.2 trails a likelier sibling), and a
  draft trained by distillation is often under-confident on its top choice only (measured: SmolLM2's draft on code,
  top children at q = 0.1-0.3 accepted 60% of the time, its other children at the same q far less).
* a node's acceptance probability is the product of ``h`` along its path (acceptances at successive depths are taken
  as independent, as Sequoia does), so the expected accepted tokens of a tree is the sum over its nodes.
* ``rank_rate(r, depth)``: how often the draft's `r`-th most likely child (0-based) of an accepted node at `depth`
  is the target's token, used to predict a level before it is drafted. Kept per depth (0, 1, 2, 3 and deeper):
  once a draft is on the target's track it tends to stay there, so deeper levels are often accepted more.

Every candidate child of an accepted node is an observation, drafted into the tree or not: its token either is or
is not the token the target emitted after that node.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

# The constants below are kept because a measurement says so: `longspec eval --auto-evidence` on the shipped SmolLM2
# draft (held-out code and prose, 2k and 4k tokens, 16 calls, 548 rounds, 9,616 observations; 2026-12-02), its
# replay scoring each value by the log-loss of its predictions made before each round (h / rank rates), and the
# modelled tokens/s of whole calls on a frozen device (`python -m longspec_hf.auto_evidence policy`, 2 prompt sets
# of 8 at 2k/4k and 2k/8k tokens).
#
# Bin edges on the draft's conditional probability q, fine near 0 and 1 where most tokens fall: log-loss of h 0.1298
# against 0.1337 for 10 even bins (32 finer bins: 0.1295, no better within the evidence's noise).
EDGES = (0.0, 0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0001)
# Pseudo-observations of the prior per bin. 1: log-loss 0.1307; 10: 0.1290, modelled rate 0.999x; kept at 3.
PRIOR_WEIGHT = 3.0
# Rank rates kept for parents at depth 0, 1, 2 and 3 or deeper. Pooled over depths they predict as well by log-loss
# (0.1386 against 0.1392: most candidates are low-ranked misses, alike at every depth), but the lookahead's predicted
# levels then cost 2.8% modelled tokens/s (0.972x / 0.999x): what differs by depth is the top ranks' rate.
DEPTHS = 4
# h tables kept for a parent's top child and for its other children: one shared table predicts as well by log-loss
# (0.1297) but costs 1.1% modelled tokens/s; three tables change nothing (0.1297).
RANK_CLASSES = 2
# Rank-r rates before any observation (ranks beyond: the last value); optimistic on purpose, since a draft believed too
# poor is only re-checked by exploration. Log-loss of rank rates 0.1392, against 0.1412 for (0.3, 0.05, 0.02, 0.01)
# and 0.1401 for a flat 0.1.
RANK_PRIOR = (0.6, 0.1, 0.05, 0.03)
# What a new call keeps of the previous calls' evidence (it may read other text): keeping none predicts worse (0.1336),
# keeping all about as well (0.1289); kept at a half.
CALL_MEMORY = 0.5


class AcceptanceModel:
    """Calibrated acceptance of draft tokens; cheap host arithmetic, updated once per round. The keyword arguments
    (the module's constants by default) exist for the replay of recorded evidence (:mod:`~longspec_hf.auto_evidence`),
    which scores other values on the same observations."""

    def __init__(self, ranks: int = 16, edges: Sequence[float] | None = None, prior_weight: float | None = None,
                 depths: int | None = None, rank_classes: int | None = None,
                 rank_prior: Sequence[float] | None = None):
        # The module's constants are read here, not bound as defaults, so that a replay can set them for a whole call.
        self.edges = tuple(EDGES if edges is None else edges)
        self.prior_weight = PRIOR_WEIGHT if prior_weight is None else prior_weight
        self.depths = DEPTHS if depths is None else depths
        self.rank_classes = RANK_CLASSES if rank_classes is None else rank_classes
        self.rank_prior = tuple(RANK_PRIOR if rank_prior is None else rank_prior)
        prior_weight, rank_classes, depths = self.prior_weight, self.rank_classes, self.depths
        self.centers = [(lo + min(hi, 1.0)) / 2 for lo, hi in zip(self.edges, self.edges[1:], strict=False)]
        self.hits = [[prior_weight * c for c in self.centers] for _ in range(rank_classes)]  # [rank class][bin]
        self.trials = [[prior_weight] * len(self.centers) for _ in range(rank_classes)]
        self.rank_hits = [[prior_weight * self.prior(r) for r in range(ranks)] for _ in range(depths)]
        self.rank_trials = [[prior_weight] * ranks for _ in range(depths)]
        self._tables: list[list[float] | None] = [None] * rank_classes

    def observe(self, probabilities: Sequence[float], accepted: Sequence[bool], depth: int = 0) -> None:
        """Candidate children of one accepted node at `depth`, in the draft's rank order: their draft probabilities
        and which one (if any) is the target's token."""
        hits, trials = self.rank_hits[min(depth, self.depths - 1)], self.rank_trials[min(depth, self.depths - 1)]
        for rank, (q, hit) in enumerate(zip(probabilities, accepted, strict=True)):
            b, c = self.bin_of(q), self.rank_class(rank)
            self.hits[c][b] += hit
            self.trials[c][b] += 1
            if rank < len(hits):
                hits[rank] += hit
                trials[rank] += 1
        self._tables = [None] * self.rank_classes

    def forget(self, keep: float = CALL_MEMORY) -> None:
        """Shrink the evidence towards the prior (a new call may read other text), keeping its shape."""
        w = self.prior_weight
        for class_hits, class_trials in zip(self.hits, self.trials, strict=True):
            for b, c in enumerate(self.centers):
                class_hits[b] = w * c + keep * (class_hits[b] - w * c)
                class_trials[b] = w + keep * (class_trials[b] - w)
        for hits, trials in zip(self.rank_hits, self.rank_trials, strict=True):
            for r in range(len(hits)):
                hits[r] = w * self.prior(r) + keep * (hits[r] - w * self.prior(r))
                trials[r] = w + keep * (trials[r] - w)
        self._tables = [None] * self.rank_classes

    def table(self, rank: int = 0) -> list[float]:
        """Calibrated acceptance per bin of children of sibling rank `rank`, made non-decreasing by pooling
        adjacent violators."""
        c = self.rank_class(rank)
        if self._tables[c] is None:
            hits, trials = self.hits[c], self.trials[c]
            self._tables[c] = monotone([h / t for h, t in zip(hits, trials, strict=True)], trials)
        return self._tables[c]

    def h(self, q: float, rank: int = 0) -> float:
        """Acceptance of a child with draft probability `q` that is its parent's `rank`-th most likely (0-based)."""
        return self.table(rank)[self.bin_of(q)]

    def rank_rate(self, rank: int, depth: int = 0) -> float:
        hits, trials = self.rank_hits[min(depth, self.depths - 1)], self.rank_trials[min(depth, self.depths - 1)]
        rank = min(rank, len(hits) - 1)
        return hits[rank] / trials[rank]

    def rank_class(self, rank: int) -> int:
        return min(rank, self.rank_classes - 1)

    def prior(self, rank: int) -> float:
        return self.rank_prior[min(rank, len(self.rank_prior) - 1)]

    def bin_of(self, q: float) -> int:
        return min(max(bisect.bisect_right(self.edges, q) - 1, 0), len(self.edges) - 2)


def monotone(values: list[float], weights: list[float]) -> list[float]:
    """The non-decreasing sequence closest to `values` in weighted least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values, weights, strict=True):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, c2 = blocks.pop()
            v1, w1, c1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return [mean for mean, _, count in blocks for _ in range(int(count))]
