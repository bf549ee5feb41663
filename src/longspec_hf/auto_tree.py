"""``tree_shape="auto"``: per round, the tree that maximises expected tokens per second on this device.

Which tree pays off depends on the device (a 2-core CPU pays for every verified node, a GPU verifies 64 nodes for
about the price of one), on the context (verification reads all of it) and on the draft (a confident draft earns
deep chains, an unsure one wide levels, a useless one none). :class:`AutoTree` grows each round's beam tree level by
level and decides, after each draft forward, from two models:

* the **cost model** of this device (:mod:`~longspec_hf.cost_model`): seconds of a verification of `T` nodes, of
  a draft forward over `m` nodes and of the rest of a round, at this context;
* the **acceptance model** of this draft (:mod:`~longspec_hf.acceptance`): a node's probability of being accepted
  from the draft's own probabilities along its path, calibrated on the rounds of the call.

With `E` the expected tokens of the round so far (one bonus token per row plus the nodes' acceptance
probabilities) and `C(T)` its predicted seconds (draft forwards run + verification + rest), a round's value is the
rate `E / C(T)`. After a draft forward the candidates for the next level are known (the beam order of
:func:`~longspec_hf.tree.top_children`): keep the `k` of them that maximise the rate, either stopping there or
continuing with a short lookahead (the next levels predicted from the rank acceptance rates). Before a draft
forward, run it only if the lookahead says it pays. The tree may end at the root: a plain decode step, when the
draft would not pay for itself (after a few such rounds one level is drafted anyway, to keep learning, at intervals
that double while it keeps not paying).

Any tree is verified exactly, so the output does not depend on these decisions (or on the timing noise behind them).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from contextvars import ContextVar

import torch

from .acceptance import AcceptanceModel
from .cost_model import CostModel
from .rounds import Round, RoundHook
from .timing import synchronize
from .tree import AUTO_ENVELOPE, DraftTree
from .verify import verify_tree

# Each constant below is kept because a measurement says so (2026-12-02, the shipped SmolLM2 draft with its 6-token
# lookup branch, held-out code and prose): the modelled tokens/s of whole greedy calls on a frozen device (`python -m
# longspec_hf.auto_evidence policy`, two prompt sets of 8 at 2k/4k and 2k/8k tokens; decisions there depend on the
# text and the constants only, not on timing noise) and the policy's host milliseconds per round beside them (2.8 ms
# as shipped, on the 2-core CPU while another job ran). Dropped by the same measurement: a margin that made drafting
# the root's level easier than the others (0.95: 1.003x / 1.000x and 1.009x without it) and a memory of 16 rounds
# for the lookup branch's mean (the whole call's mean: 1.000x / 1.000x; a 4-round memory 0.998x); both dropped
# together: 1.000x on the first prompt set.
#
# Level widths considered (the envelope's width caps them). (1, 2, 4, 8, 16): 0.976x / 0.994x; every width up to 16:
# 0.958x / 1.001x at twice the host time (5.7 against 2.8 ms per round).
WIDTHS = (1, 2, 3, 4, 6, 8, 12, 16)
# Levels the lookahead predicts beyond the decision (a chain's first level often pays only with the next). 1:
# 0.982x; 2: 0.962x / 1.000x; 8: 1.000x / 1.000x at 1.4x the host time.
HORIZON = 4
# Nodes of a predicted level whose children the lookahead considers. 1: 0.972x; 2: 0.991x / 1.000x; 16: 1.000x /
# 1.000x at 1.2x the host time.
FRONTIER = 4
# Rounds between refits of the cost curves: a fit of the three curves reads every stored sample (0.18 ms each at a
# few hundred samples), which per round would add a fifth to the policy's host time.
REFIT_EVERY = 8
# Rounds without drafting after which one level is drafted anyway, to keep learning (also how often a withdrawn
# lookup branch is retried). 2: 0.942x; 8: 1.018x / 1.000x; 16: 0.971x. Each such round that ends without a tree
# doubles the wait, up to EXPLORE_MAX, so a draft that never pays costs ever fewer draft forwards (a bound for a
# useless draft, which the evidence above never met: tested in tests/test_auto_tree.py).
EXPLORE_EVERY, EXPLORE_MAX = 4, 64
# A prompt-lookup branch's accepted tokens beyond the draft's, per row and round, before any round verified it:
# optimistic (the branch is tried early), worth one round, then the call's mean. 0: 0.959x / 0.977x; 3: 0.947x /
# 0.980x.
LOOKUP_PRIOR = 1.0
# Per call, the acceptance model's predictions are scaled by how the draft's accepted tokens compare with them: each
# round moves the scale by (accepted + 1) / (predicted + 1) to this power. The product of per-node probabilities
# misses that acceptance along a path is correlated (a draft on track stays on it), by an amount that depends on the
# text. No scale: 0.959x / 0.984x; 0.5: 0.991x. SCALE_RANGE is a guard against a runaway scale, not a tuned value: the
# replay of the evidence never reached it.
SCALE_RATE, SCALE_RANGE = 0.2, (0.5, 2.0)
# While set (by `longspec_hf.auto_evidence.recording`), each call's rounds are recorded in a list it gives out.
EVIDENCE: ContextVar = ContextVar("longspec_auto_evidence", default=None)


def measure_sizes(device: torch.device) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(tree sizes whose verification is timed, level widths whose draft forward is timed) at first use."""
    if device.type == "cuda":
        return (1, 16, 64, 129), (4, 16, 16, 1)
    return (1, 8, 32), (4, 8, 1)


def star_tree(roots: torch.Tensor, size: int) -> DraftTree:
    """A tree of `size` nodes (the root and `size - 1` children) per row: what a verification of that size costs
    does not depend on the tree's structure."""
    batch, device = roots.shape[0], roots.device
    parents = torch.zeros(batch, size, dtype=torch.long, device=device)
    parents[:, 0] = -1
    depths = torch.ones(size, dtype=torch.long, device=device)
    depths[0] = 0
    ancestors = torch.eye(size, dtype=torch.bool, device=device).expand(batch, size, size).clone()
    ancestors[:, :, 0] = True
    return DraftTree(tokens=roots[:, None].expand(batch, size).contiguous(), parents=parents, depths=depths,
                     ancestors=ancestors, logprobs=torch.zeros(batch, size, device=device))


class AutoTree:
    """The :class:`~longspec_hf.tree.TreeGrowth` of one ``generate()`` call under ``tree_shape="auto"``.

    The loop calls :meth:`measure` once, then per round :meth:`begin_round` (the object is then passed to the
    drafter as its tree shape), :meth:`verified` after acceptance and :meth:`end_round` after the commit, and
    :meth:`finish` at the end.
    """

    def __init__(self, cost: CostModel, acceptance: AcceptanceModel, device: torch.device, stats=None,
                 envelope: tuple[int, ...] = AUTO_ENVELOPE):
        self.cost, self.acceptance, self.device, self.stats = cost, acceptance, device, stats
        self.envelope = envelope
        self.max_width = max(envelope)
        self.widths = [w for w in WIDTHS if w <= self.max_width]
        self.forced: tuple[int, ...] | None = None
        self.rounds_without_draft = 0
        self.explore_every, self._exploring = EXPLORE_EVERY, False
        self._round_start: float | None = None
        self._previous: tuple[int, int, int, float, float] | None = None  # rows, context, nodes, draft s, verify s
        self._fit: tuple[int, int] | None = None  # (rows, context) the curves were fitted at
        self._rounds_since_fit = 0
        self.lookup = self._lookup_offered = False  # whether this round verifies the prompt-lookup branch (offered)
        self.lookup_gain, self._lookup_weight = LOOKUP_PRIOR, 1.0
        self.rounds_without_lookup = 0
        self._last_round = (1.0, 1, 0.0)  # per row: expected tokens, tree nodes, draft seconds of the last round
        self.scale = 1.0  # accepted / predicted draft tokens of this call, as a correction of the predictions
        self.evidence = EVIDENCE.get()  # a list while recording evidence for the replay of auto's constants
        if self.evidence is not None:
            self.evidence = self.evidence.new_call()

    # ----------------------------------------------------------------------------------------------------------------
    # first use: a few timed forwards

    def measure(self, target, state, drafter, draft_state, roots: torch.Tensor, attn_backend: str,
                verify: Callable = verify_tree, warm_up: bool = False) -> float:
        """Time verification (through `verify`) and draft forwards at this context if the cost model has no
        measurement near it; returns the seconds spent. With `warm_up` (compiled rounds) every timed forward runs
        once untimed first, so compilation is not measured as cost. The target's cache and the draft's state are
        left as they were."""
        rows, context = roots.shape[0], state.cache.get_seq_length()
        if self.cost.frozen:
            return 0.0
        need_verify = not self.cost.has_near("verify", rows, context)
        need_draft = not self.cost.has_near("draft", rows, context)
        if not (need_verify or need_draft):
            return 0.0
        start = time.perf_counter()
        tree_sizes, level_widths = measure_sizes(roots.device)
        recorded = self.cost
        for timed in ([False] if warm_up else []) + [True]:
            self.cost = recorded if timed else CostModel()  # the warm-up's timings are thrown away
            if need_verify:
                for size in tree_sizes:
                    synchronize(self.device)
                    t0 = time.perf_counter()
                    verify(target, state, star_tree(roots, size), attn_backend)
                    synchronize(self.device)
                    self.cost.add("verify", rows, context, size, time.perf_counter() - t0, anchor=True)
                    state.cache.crop(-size)
            if need_draft:
                self.forced = level_widths
                self.begin_round(context, rows, len(level_widths))
                drafter.draft(draft_state, roots, state.next_positions, state, self)
                drafter.discard(draft_state)
                self.forced = None
                self._round_start = self._fit = None  # refit with the new measurements
        self.cost = recorded
        return time.perf_counter() - start

    # ----------------------------------------------------------------------------------------------------------------
    # one round

    def begin_round(self, context: int, rows: int, room: int, lookup_nodes: int = 0) -> AutoTree:
        """Start a round at `context` committed slots for `rows` rows, at most `room` levels deep. A prompt-lookup
        branch of `lookup_nodes` tokens is on offer: :attr:`lookup` says whether to verify it (then the draft's nodes
        are priced on top of it)."""
        # No synchronisation: the previous round's last kernels (the commit) are still queued on an accelerator;
        # they are timed with this round's first draft level or verification, whose results the host waits for.
        now = time.perf_counter()
        if self._previous is not None and self._round_start is not None:
            p_rows, p_context, p_nodes, p_draft, p_verify = self._previous
            self.cost.add("rest", p_rows, p_context, p_nodes, max(now - self._round_start - p_draft - p_verify, 0.0))
        self._round_start, self._previous = now, None
        self.context, self.rows, self.depth_cap = context, rows, max(min(room, len(self.envelope)), 0)
        self._rounds_since_fit += 1
        if self._fit is None or self._fit[0] != rows or self._rounds_since_fit >= REFIT_EVERY \
                or abs(context - self._fit[1]) > 0.05 * self._fit[1]:
            self.verify_curve = self.cost.curve("verify", rows, context)
            self.draft_curve = self.cost.curve("draft", rows, context)
            self.rest_curve = self.cost.curve("rest", rows, context)
            self._fit, self._rounds_since_fit = (rows, context), 0
        self._lookup_offered = lookup_nodes > 0
        self._exploring = False
        self.lookup = self._lookup_offered and self.lookup_pays(lookup_nodes)
        # Every row emits its bonus token, and a verified lookup branch its running mean of tokens beyond the draft's
        # tree: draft nodes must raise the rate of the round as it already is, branch included.
        self.base_expected = rows * (1.0 + (self.lookup_gain if self.lookup else 0.0))
        self.expected = self.base_expected
        self.nodes, self.draft_seconds = 1 + (lookup_nodes if self.lookup else 0), 0.0  # nodes to verify
        self.tree_nodes = 1  # nodes of the draft's tree (the lookup branch is grafted after them)
        self.level_acceptance = [[1.0] for _ in range(rows)]  # of the current level's nodes, per row
        # h along the path of each of the level's nodes, per row, and of every kept node of the round: what the
        # call's scale multiplies (filled only while recording, so that the evidence can replay other scale rules)
        self.level_paths: list[list[list[float]]] = [[[]] for _ in range(rows)]
        self.kept_paths: list[list[float]] = []
        self.level_means = [1.0]
        self.levels: list[tuple[int, list, list]] = []  # (first node, top-K ids [B][m][K], their probabilities)
        self.shape: list[int] = []
        self.drafted: list[int] = []  # widths of the levels that ran through the draft
        self.draft_end = now
        return self

    def lookup_pays(self, length: int) -> bool:
        """Does a lookup branch of `length` nodes add tokens faster than the round it joins makes them? Its expected
        tokens over the seconds its nodes add, against the last round's expected tokens over its seconds."""
        if self.rounds_without_lookup + 1 >= EXPLORE_EVERY:
            return True  # keep its estimate current
        tokens, nodes, draft_seconds = self._last_round
        base = self.seconds(draft_seconds, nodes)
        added = self.seconds(draft_seconds, nodes + length) - base
        return self.lookup_gain * base >= tokens * added

    def seconds(self, draft_seconds: float, nodes: int) -> float:
        return max(draft_seconds + self.verify_curve(nodes) + self.rest_curve(nodes), 1e-9)

    def lookahead(self, expected: float, draft_seconds: float, nodes: int, frontier: list[float], depth: int) -> float:
        """The best rate reachable by drafting up to HORIZON more levels from `frontier` (acceptance of the current
        level's nodes, averaged over rows), each level predicted from the rank acceptance rates."""
        best = -math.inf
        for level in range(HORIZON):
            if depth + level >= self.depth_cap or not frontier:
                break
            rates = [min(self.scale * self.acceptance.rank_rate(r, depth + level), 1.0) for r in range(self.max_width)]
            draft_seconds += self.draft_curve(len(frontier))
            parents = sorted(frontier, reverse=True)[:FRONTIER]
            children = sorted((a * r for a in parents for r in rates), reverse=True)[: self.max_width]
            gains = list(itertools.accumulate(children, initial=0.0))
            level_best, keep = -math.inf, 0
            for k in self.widths:
                if k > len(children):
                    break
                rate = (expected + self.rows * gains[k]) / self.seconds(draft_seconds, nodes + k)
                if rate > level_best:
                    level_best, keep = rate, k
            best = max(best, level_best)
            expected, nodes, frontier = expected + self.rows * gains[keep], nodes + keep, children[:keep]
        return best

    def expand(self, depth: int, width: int) -> bool:
        if self.forced is not None:
            go = depth < len(self.forced)
        elif depth >= self.depth_cap:
            go = False
        else:
            stop = self.expected / self.seconds(self.draft_seconds, self.nodes)
            go = self.lookahead(self.expected, self.draft_seconds, self.nodes, self.level_means, depth) > stop
            if not go and depth == 0 and self.rounds_without_draft + 1 >= self.explore_every:
                go = self._exploring = True  # keep the acceptance model learning while the draft does not pay
        now = time.perf_counter()
        if go:
            self._step_start = now
        else:
            self.draft_end = now
        return go

    def choose(self, depth: int, parent_local: torch.Tensor, child_logprobs: torch.Tensor,
               level_logprobs: torch.Tensor, vocab: torch.Tensor | None = None) -> int:
        width, children = level_logprobs.shape[1], child_logprobs.shape[1]
        top = level_logprobs.topk(min(self.max_width, level_logprobs.shape[-1]), dim=-1)  # [B, m, K]
        top_ids = top.indices if vocab is None else vocab[top.indices]
        k = top_ids.shape[-1]
        # What the choice and the round's acceptance observations need, in one transfer: the one synchronisation per
        # level (token ids and ranks are exact in float64).
        host = torch.cat([child_logprobs.exp().double(), parent_local.double(), top.values.exp().double().flatten(1),
                          top_ids.double().flatten(1)], dim=1).tolist()  # [B, 2 K' + 2 m K]
        probabilities = [row[:children] for row in host]  # [B][K']
        parents = [[int(p) for p in row[children:2 * children]] for row in host]
        split = 2 * children + width * k
        level_probabilities = [[row[2 * children + j * k:2 * children + (j + 1) * k] for j in range(width)]
                               for row in host]  # [B][m][K]
        level_ids = [[[int(t) for t in row[split + j * k:split + (j + 1) * k]] for j in range(width)]
                     for row in host]  # [B][m][K]
        now = time.perf_counter()
        self.cost.add("draft", self.rows, self.context, width, now - self._step_start, anchor=self.forced is not None)
        self.draft_seconds += self.draft_curve(width) if self.cost.frozen else now - self._step_start
        self.drafted.append(width)
        self.draft_end = now
        if self.forced is not None:
            return self.forced[depth]
        self.levels.append((self.tree_nodes - width, level_ids, level_probabilities))
        raw = [self.calibrated(parents[r], probabilities[r]) for r in range(self.rows)]  # [B][K], in beam order
        candidates = [[self.level_acceptance[r][p] * min(self.scale * h, 1.0) for p, h in zip(
            parents[r], raw[r], strict=True)] for r in range(self.rows)]  # [B][K]
        means = [sum(column) / self.rows for column in zip(*candidates, strict=True)]
        gains = list(itertools.accumulate(means, initial=0.0))
        best, keep = self.expected / self.seconds(self.draft_seconds, self.nodes), 0
        for k in self.widths:
            if k > len(means):
                break
            expected = self.expected + self.rows * gains[k]
            rate = expected / self.seconds(self.draft_seconds, self.nodes + k)
            if depth + 1 < self.depth_cap:
                rate = max(rate, self.lookahead(expected, self.draft_seconds, self.nodes + k, means[:k], depth + 1))
            if rate > best:
                best, keep = rate, k
        if keep:
            self.expected += self.rows * gains[keep]
            self.nodes += keep
            self.tree_nodes += keep
            self.level_acceptance = [row[:keep] for row in candidates]
            if self.evidence is not None:  # only a recording replays the scale: no per-level lists otherwise
                self.level_paths = [[self.level_paths[r][p] + [h] for p, h in zip(
                    parents[r][:keep], raw[r][:keep], strict=True)] for r in range(self.rows)]
                self.kept_paths += [path for row in self.level_paths for path in row]
            self.level_means = means[:keep]
            self.shape.append(keep)
        return keep

    def calibrated(self, parents: list[int], probabilities: list[float]) -> list[float]:
        """h of one row's candidates (beam order: a parent's children come in its own rank order), before the
        call's scale."""
        seen: dict[int, int] = {}
        out = []
        for parent, q in zip(parents, probabilities, strict=True):
            rank = seen.get(parent, 0)
            seen[parent] = rank + 1
            out.append(self.acceptance.h(q, rank))
        return out

    def verified(self) -> None:
        """After acceptance (whose host transfer waited for the verification forward)."""
        self._verified = time.perf_counter()

    def end_round(self, tree: DraftTree, paths: list[list[int]], new_tokens: list[list[int]]) -> None:
        """Record the round: costs, the acceptance observations of every drafted node on an accepted path, stats."""
        verify_seconds = self._verified - self.draft_end
        self.cost.add("verify", self.rows, self.context, len(tree), verify_seconds)
        self._previous = (self.rows, self.context, len(tree), self.draft_seconds, verify_seconds)
        self.rounds_without_draft = 0 if self.levels else self.rounds_without_draft + 1
        if self.shape:
            self.explore_every = EXPLORE_EVERY
        elif self._exploring:
            self.explore_every = min(2 * self.explore_every, EXPLORE_MAX)
        draft_expected = self.expected - self.base_expected + self.rows  # the round's tokens without the branch
        self._last_round = (draft_expected / self.rows, self.tree_nodes, self.draft_seconds)
        accepted = sum(node < self.tree_nodes for path in paths for node in path)
        beyond = sum(node >= self.tree_nodes for path in paths for node in path) / self.rows
        observations = self.observations(paths, new_tokens)
        if self.evidence is not None and self.forced is None:
            self.evidence.append({"rows": self.rows, "context": self.context, "drafted": self.drafted,
                                  "nodes": len(tree), "emitted": sum(map(len, new_tokens)), "paths": self.kept_paths,
                                  "accepted": accepted, "lookup_beyond": beyond if self.lookup else None,
                                  "observations": observations})
        if self.levels and self.forced is None:
            factor = ((accepted + 1) / (self.expected - self.base_expected + 1)) ** SCALE_RATE
            self.scale = min(max(self.scale * factor, SCALE_RANGE[0]), SCALE_RANGE[1])
        if self.lookup:
            self._lookup_weight += 1
            self.lookup_gain += (beyond - self.lookup_gain) / self._lookup_weight
            self.rounds_without_lookup = 0
        elif self._lookup_offered:
            self.rounds_without_lookup += 1
        for probabilities, hits, depth in observations:
            self.acceptance.observe(probabilities, hits, depth)
        if self.stats is not None:
            name = ",".join(map(str, self.shape)) or "none"
            self.stats.tree_shapes[name] = self.stats.tree_shapes.get(name, 0) + 1
            self.stats.predicted_accepted += self.expected - self.base_expected

    def observations(self, paths: list[list[int]], new_tokens: list[list[int]]) -> list[tuple[list, list, int]]:
        """`(draft probabilities, whether each is the target's token, depth)` of the candidate children of every
        drafted node on an accepted path (the root included), in the draft's rank order."""
        out = []
        for row, (path, tokens) in enumerate(zip(paths, new_tokens, strict=True)):
            for node, token in zip([0, *path], tokens, strict=True):
                for depth, (first, ids, probabilities) in enumerate(self.levels):
                    if first <= node < first + len(ids[row]):
                        local = node - first
                        out.append((probabilities[row][local], [t == token for t in ids[row][local]], depth))
        return out

    def finish(self) -> None:
        self.cost.save()


class AutoShape(RoundHook):
    """``tree_shape="auto"`` in the loop: each round's tree grown by an :class:`AutoTree`, which also decides whether
    the round verifies the prompt-lookup branch on offer (plan after the branch's hook)."""

    def __init__(self, auto: AutoTree):
        self.auto = auto

    def plan(self, round: Round) -> None:
        branch = 0 if round.branch is None else round.branch.shape[1]
        round.shape = self.auto.begin_round(round.context, len(round.rows), round.room, branch)
        if not self.auto.lookup:
            round.branch = None

    def accepted(self, round: Round) -> None:
        self.auto.verified()

    def committed(self, round: Round) -> None:
        self.auto.end_round(round.tree, round.paths, round.new_tokens)

    def finish(self) -> None:
        self.auto.finish()
