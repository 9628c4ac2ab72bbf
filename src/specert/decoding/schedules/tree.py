"""The certified tree's widths: each position gets the smallest width its drafter-side certificate guarantees.

With D_q(m) the drafter-side certificate of the drafter's top-m at a position (THEORY.md section 7), a position
gets

    m = min { m in 1 .. max_width : D_q(m) > eps_hat },   0 if none,

so that, wherever the target is within KL eps_hat of the drafter, its greedy token is among the m drafted. A width
is never cut to fit the node budget: fewer than m would void the guarantee, so a position whose m no longer fits
gets no children (and the budget stays for the positions after it).
"""

from __future__ import annotations

import torch

from specert.theory.certificates import drafter_certificate


def certified_widths(logits: torch.Tensor | None, frontier: int, budget_left: int, max_width: int, eps_hat: float,
                     certificate: float | None = None) -> list[int]:
    """The widths of a tree level's ``frontier`` positions; ``logits [frontier, V]`` the drafter's there,
    ``certificate`` D_q(1) of a frontier of one when the drafter computed it, ``budget_left`` the nodes still free.
    Without a distribution (``logits`` None) there is nothing to certify: width 1 each, if all fit, else 0 each.

    A peaked position is certified at width 1, one with two tied tokens at 2 (D_q(2) = 0.90 > 0.5), and two tied
    ones far less peaked not at all (D_q(m) = 0.06 for m >= 2):

    >>> certified_widths(torch.tensor([[9.0, 0, 0, 0, 0, 0], [2.0, 2, -2, -2, -2, -2], [1.0, 1, 0, 0, 0, 0]]),
    ...                  3, 16, 3, 0.5)
    [1, 2, 0]
    """
    if logits is None:
        return [1] * frontier if budget_left >= frontier else [0] * frontier
    out = []
    for i in range(frontier):
        m = 0
        for width in range(1, min(max_width, logits.shape[-1] - 1) + 1):
            if width == 1 and certificate is not None:  # the drafter's own D_q(1) of its only position
                d = certificate
            else:
                d = float(drafter_certificate(logits[i], width))
            if d > eps_hat:
                m = width
                break
        m = m if m <= budget_left else 0  # a cut width would void the guarantee: no children instead
        budget_left -= m
        out.append(m)
    return out
