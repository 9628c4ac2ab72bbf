"""The certified schedules (``k=auto``, ``tree=auto``): draft shapes decided per step from the drafter-side
certificate D_q(m) (THEORY.md section 7) against an online estimate eps_hat of the drafter's KL(p || q).

:class:`CertifiedSchedule` holds a schedule's parts and runs them in the decoder's order: per step, ``should_draft``
(:mod:`.backoff`), ``widths`` depth by depth (:mod:`.tree`, or the chain's rule: :mod:`.chain`) and ``may_extend``,
then ``observe`` (what verification judged: :mod:`.classes`' rates, the KLs after the drafted positions, the audit:
:mod:`.audit`) and ``timed`` (:mod:`.costs`' timings). eps_hat is the ``quantile`` of the KLs in the history (0 before
the first, so a drafter's first step drafts in full).
"""

from __future__ import annotations

import math

import torch

from specert.decoding.schedules.audit import Audit, kls_at, measured_positions
from specert.decoding.schedules.backoff import BackOff
from specert.decoding.schedules.base import Schedule
from specert.decoding.schedules.chain import CertifiedChain, ChainStep
from specert.decoding.schedules.classes import ClassRates, kl_thresholds
from specert.decoding.schedules.history import History
from specert.decoding.schedules.settings import CERTIFIED, ScheduleSettings
from specert.decoding.schedules.tree import certified_widths


class CertifiedSchedule(Schedule):
    """Widths from the drafter-side certificate: a chain (``max_width`` 1, the stopping rule of :mod:`.chain`) or a
    tree (the smallest certified width per position, :mod:`.tree`, within ``budget`` nodes).

    Args:
        max_depth: the deepest position drafted.
        max_width: 1 for a chain, else the widest a tree position may be.
        budget: the most nodes per tree (default: a full tree of ``max_width`` and ``max_depth``).
        quantile: eps_hat's quantile of the measured KLs, in (0, 1].
        cost: c, a drafted token's cost in one-token target forwards, if given (else measured).
        history: what earlier generations measured about the drafter (:class:`History`); new if None.
        settings: the tunables (:class:`ScheduleSettings`; its defaults if None).

    Parts (public, read them freely): ``history``, ``rates`` (:class:`~.classes.ClassRates`), ``chain``
    (:class:`~.chain.CertifiedChain`: prices, lambda, settled), ``backoff`` (:class:`~.backoff.BackOff`),
    ``guarantees`` (this generation's :class:`~.audit.Audit`), ``eps`` (the class thresholds, eps_hat last).
    """

    def __init__(self, max_depth: int = 16, max_width: int = 1, budget: int | None = None, quantile: float = 0.9,
                 cost: float | None = None, history: History | None = None, settings: ScheduleSettings | None = None):
        if not 0 < quantile <= 1:
            raise ValueError(f"the KL quantile must be in (0, 1], got {quantile}")
        if cost is not None and not cost >= 0:
            raise ValueError(f"the drafted token's cost relative to a target forward must be >= 0, got {cost}")
        if settings is not None and not isinstance(settings, ScheduleSettings):
            raise ValueError(f"settings must be a ScheduleSettings, got {type(settings).__name__}")
        self.settings = settings if settings is not None else ScheduleSettings()
        self.max_depth, self.max_width, self.quantile = max_depth, max_width, quantile
        self.budget = budget if budget is not None else int(sum(max_width**d for d in range(1, max_depth + 1)))
        self.history = history if history is not None else History()
        self.eps = kl_thresholds(self.history.kls, quantile, self.settings.levels)
        self.rates = ClassRates(self.history, self.settings)
        self.chain = CertifiedChain(self.settings, self.history, self.rates, max_depth, cost)
        self.backoff = BackOff(self.settings.max_backoff)
        self.guarantees = Audit()

    @property
    def room(self) -> int:
        """Drafted tokens the generation can still use (set by the decoder before each step)."""
        return self.chain.room

    @room.setter
    def room(self, value: int) -> None:
        self.chain.room = value

    @property
    def certifies(self) -> bool:
        """Whether the drafter should compute its certificate at this step: not at a settled chain's unmeasured
        steps."""
        return not self.chain.settled or self.chain.steps % self.settings.sample_every == 0

    @property
    def eps_hat(self) -> float:
        """The estimate of the drafter's KL(p || q): the ``quantile`` of the latest measured KLs (0 before any)."""
        return self.eps[-1]

    def widths(self, depth, logits, frontier, budget_left, certificate=None, guess=None):
        if self.max_width == 1 and frontier == 1:
            return [self._chain_width(depth, None if logits is None else logits[0], certificate, guess)
                    if budget_left else 0]
        return certified_widths(logits, frontier, budget_left, self.max_width, self.eps_hat, certificate)

    def _chain_width(self, depth: int, q: torch.Tensor | None, certificate: float | None,
                     guess: tuple[int, int] | None) -> int:
        return self.chain.width(depth, q, certificate, guess, self.eps, self.backoff.probe)

    def may_extend(self, depth):
        """A tree, or a chain before eps_hat is measured: yes. A chain: the scoring rule (:mod:`.chain`)."""
        if self.max_width > 1 or not self.chain.measuring(True, self.eps_hat):
            return True
        return self.chain.may_extend(depth)

    def should_draft(self) -> bool:
        return self.backoff.should_draft()

    def timed(self, draft_seconds, verify_seconds, drafted):
        self.history.record_step(drafted, draft_seconds, verify_seconds)

    def observe(self, tree, target_logits, path):
        """Learn from a verified step: ``tree`` the draft, ``target_logits [1 + N, V]`` the target's rows (row 0 after
        the context, row 1 + i after node i), ``path`` the accepted nodes."""
        step = self.chain.finish()
        drafted_any = bool(tree.tokens) and not (step.probed and not path)  # a rejected probe drafted nothing
        self.backoff.probe = False
        # a chain's empty step counts only where its rule stopped the first position (not where the drafter had
        # nothing to draft, nor where drafting pays: lambda > 1); a tree's always (the back-off's module docstring)
        if step.asked or drafted_any or self.max_width > 1:
            self.backoff.after(drafted_any or self.chain.rate > 1)
        if self.max_width == 1:
            self._learn_chain(step, tree, target_logits, path)
        positions = measured_positions(tree, path)
        if not positions or tree.logits is None or not step.measured:
            return
        kls, greedy = kls_at(tree, target_logits, positions, self.eps_hat)
        for j, (pos, kl, token) in enumerate(zip(positions, kls, greedy)):
            if self.max_width == 1 and not (j < len(step.drafted) and step.drafted[j] == CERTIFIED):
                continue  # a chain position drafted past the certified ones: no guarantee to audit
            self.guarantees.guarantee(kl, self.eps_hat, token, [tree.tokens[c] for c in tree.children(pos)])
        self.history.kls.extend(kl for kl in kls if math.isfinite(kl))
        self.eps = kl_thresholds(self.history.kls, self.quantile, self.settings.levels)

    def _learn_chain(self, step: ChainStep, tree, target_logits: torch.Tensor, path: list[int]) -> None:
        """A chain's verified step: its yield (for lambda), its first position (every step), and its measured
        positions by class (the rates, before eps_hat moves; the audit's positions)."""
        self.history.yields.append((len(tree.tokens), len(path) + 1))
        first = step.first_accepted(tree, target_logits, path)
        if first is not None:
            self.rates.record_first(first)
        if self.chain.measuring(tree.logits is not None, self.eps_hat):
            for level, accepted in step.judged(tree, target_logits, path):
                self.rates.record(level, accepted)
                self.guarantees.position(level == CERTIFIED, accepted)

    def audit(self) -> dict:
        return dict(self.guarantees.counts)
