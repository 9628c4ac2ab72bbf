"""Draft shapes: how many candidates each drafted position gets, fixed or decided per step.

A schedule is asked, depth by depth while the drafter builds its tree, for the width of every position of the
frontier given the drafter's logits there; it then observes each verified step (:mod:`.base` has the interface).

=======================  ==================================================================================
spec (``k`` / ``tree``)  schedule
=======================  ==================================================================================
``k=4``                  a chain of 4 tokens (:class:`FixedSchedule`)
``tree=4,2,1``           a tree, width 4 at depth 0, 2 at depth 1, 1 at depth 2
``k=auto[:K]``           certified chain: draft while the expected accepted tokens pay for drafting, at most K
                         (16) tokens (:mod:`.chain`)
``tree=auto[:B]``        certified tree: each position gets the smallest m <= 8 with D_q(m) > eps_hat, at most B
                         (16) nodes, depth <= 8; a position whose m no longer fits gets no children (:mod:`.tree`)
``k=heuristic[:K]``      transformers' heuristic: start at K (5); +2 after a fully accepted step, -1 otherwise
=======================  ==================================================================================

The certified schedules (:class:`CertifiedSchedule`) use the drafter-side certificate D_q(m) (THEORY.md section 7):
if the target is within KL eps of the drafter and D_q(m) > eps, the drafter's top-m holds the target's greedy token.

Glossary, each term defined in the module named:

=====================  ============================================================================================
eps_hat                the ``quantile`` (0.9) of KL(p || q) measured at the latest 512 verified positions
                       (:func:`~.classes.kl_thresholds`); a position is *certified* where D_q(1) > eps_hat
class, alpha_l         a chain position's class 0 .. ``CERTIFIED``: the KL levels its D_q(1) exceeds; alpha_l its
                       measured acceptance rate (:mod:`.classes`)
F, c, V(n), C_n        a step's fixed cost, a drafted token's, the verifying forward's, a step's total, all in
                       one-token target forwards and measured from the step timings (:mod:`.costs`)
lambda                 tokens per target forward of the latest chain steps, at least 1 (:mod:`.costs`)
S_j, E_k, G_k          survival to position j, expected tokens of a chain of k, the stopping rule (:mod:`.chain`)
settled                a chain drafting one token whatever its class, measured one step in 8 (:mod:`.chain`)
back-off               plain decoding for 1, 2, 4, ... 32 steps after an empty step (:mod:`.backoff`)
audit                  held / held_covered / exceeded at certified positions (:mod:`.audit`)
history                what a schedule measured about a drafter, kept by the drafter (:class:`History`)
settings               the tunables, with the figures behind them (:class:`ScheduleSettings`)
=====================  ============================================================================================

Layout, each module importing only those above it: :mod:`.settings`, :mod:`.history`, :mod:`.costs`,
:mod:`.classes`, :mod:`.backoff`, :mod:`.audit`, :mod:`.tree`, :mod:`.chain`, :mod:`.base`, :mod:`.certified`,
:mod:`.spec` (:func:`make_schedule`).
"""

from specert.decoding.schedules.base import FixedSchedule, HeuristicSchedule, Schedule
from specert.decoding.schedules.certified import CertifiedSchedule
from specert.decoding.schedules.history import History
from specert.decoding.schedules.settings import CERTIFIED, ScheduleSettings
from specert.decoding.schedules.spec import make_schedule

__all__ = ["CERTIFIED", "CertifiedSchedule", "FixedSchedule", "HeuristicSchedule", "History", "Schedule",
           "ScheduleSettings", "make_schedule"]
