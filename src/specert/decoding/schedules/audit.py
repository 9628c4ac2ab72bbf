"""What a verified step measures at the drafted positions (the KL after them), and the guarantee audit it feeds.

The guarantee of the certified schedules (THEORY.md section 7): where the target is within KL eps_hat of the
drafter and a position's width m has D_q(m) > eps_hat, the drafter's top-m holds the target's greedy token. The
audit counts, over one generation, at the verified certified positions that were measured (every position of a
certified tree; the certified ones of a chain, class ``CERTIFIED``):

==========================  ==============================================================================
``held``                    KL(p || q) <= the eps_hat the width was chosen with
``held_covered``            of those, the target's greedy token was among the position's drafted tokens:
                            must equal ``held`` (D_q's soundness, live)
``exceeded``                KL > eps_hat: the estimate was wrong there (the guarantee says nothing)
``certified_reached``       a chain's certified positions reached by verification (drafted, or judged where
``certified_accepted``      the chain stopped), and of those accepted
``uncertified_reached``     ... its positions of the lower classes
``uncertified_accepted``
==========================  ==============================================================================
"""

from __future__ import annotations

import torch

from specert.theory.divergence import kl_near
from specert.theory.tensors import argmax


def measured_positions(tree, path: list[int]) -> list[int]:
    """The positions (-1 the root, else a node) on the accepted ``path`` whose drafted children were verified and
    whose drafter logits were computed: where the step measures the KL."""
    return [p for p in [-1] + path if tree.children(p) and tree.expanded[p + 1]]


def kls_at(tree, target_logits: torch.Tensor, positions: list[int], eps_hat: float) -> tuple[list, list]:
    """(KL(p || q), the target's greedy token) after each of ``positions``: ``target_logits [1 + N, V]`` the
    target's rows, ``tree.logits [1 + N, V]`` the drafter's; the KL exact near ``eps_hat`` (:func:`kl_near`)."""
    rows = [p + 1 for p in positions]
    # a chain's rows are consecutive: a view, not a copy of them
    rows = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else torch.tensor(rows)
    return kl_near(target_logits[rows], tree.logits[rows], eps_hat).tolist(), argmax(target_logits[rows]).tolist()


class Audit:
    """One generation's guarantee audit (the module docstring's counts)."""

    def __init__(self):
        self.counts = dict(held=0, held_covered=0, exceeded=0, certified_reached=0, certified_accepted=0,
                           uncertified_reached=0, uncertified_accepted=0)

    def position(self, certified: bool, accepted: bool) -> None:
        """A chain position reached by verification, certified or not, and whether it was accepted."""
        name = "certified" if certified else "uncertified"
        self.counts[f"{name}_reached"] += 1
        self.counts[f"{name}_accepted"] += accepted

    def guarantee(self, kl: float, eps_hat: float, greedy: int, drafted: list[int]) -> None:
        """A certified position's check: its KL against ``eps_hat``, and where it held whether the target's
        ``greedy`` token was among the position's ``drafted`` tokens."""
        if kl <= eps_hat:
            self.counts["held"] += 1
            self.counts["held_covered"] += int(greedy in drafted)
        else:
            self.counts["exceeded"] += 1
