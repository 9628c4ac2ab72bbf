"""A schedule from the ``k`` / ``tree`` options: :func:`make_schedule`."""

from __future__ import annotations

from specert.decoding.schedules.base import FixedSchedule, HeuristicSchedule, Schedule
from specert.decoding.schedules.certified import CertifiedSchedule
from specert.decoding.schedules.history import History
from specert.decoding.schedules.settings import ScheduleSettings


def make_schedule(k: int | str | None = None, tree: str | list[int] | None = None, quantile: float = 0.9,
                  history: History | None = None, settings: ScheduleSettings | None = None) -> Schedule:
    """A schedule from the ``k`` / ``tree`` options (the table in :mod:`specert.decoding.schedules`); default: a
    chain of 4. A certified schedule starts from ``history`` (what earlier generations measured about the drafter)
    when given, with ``settings`` (:class:`ScheduleSettings`, its defaults if None).

    >>> make_schedule(tree="4,2,1").schedule, make_schedule(k="auto:8").max_depth
    ([4, 2, 1], 8)
    """
    if tree is not None and k is not None:
        raise ValueError("give either k (a chain) or a tree width schedule, not both")
    text = str(tree if tree is not None else (k if k is not None else 4)).strip()
    name, _, arg = text.partition(":")
    if name in ("auto", "heuristic"):
        try:
            n = int(arg) if arg else None
        except ValueError:
            raise ValueError(f"{text!r}: {name} takes a whole number, e.g. {name}:8") from None
        if n is not None and n < 1:
            raise ValueError(f"{text!r}: the bound must be >= 1")
        if name == "heuristic":
            if tree is not None:
                raise ValueError("the heuristic schedule drafts chains: use k=heuristic")
            return HeuristicSchedule(n or 5)
        if tree is not None:
            return CertifiedSchedule(max_depth=8, max_width=8, budget=n or 16, quantile=quantile, history=history,
                                     settings=settings)
        return CertifiedSchedule(max_depth=n or 16, max_width=1, quantile=quantile, history=history, settings=settings)
    if tree is None:
        try:
            k = int(text)
        except ValueError:
            raise ValueError(f"k (draft length) must be a whole number >= 1, auto[:K] or heuristic[:K]; got {text!r}") \
                from None
        if k < 1:
            raise ValueError(f"k (draft length) must be a whole number >= 1, got {k}")
        return FixedSchedule([1] * k)
    if isinstance(tree, str):
        try:
            tree = [int(w) for w in tree.split(",")]
        except ValueError:
            raise ValueError(f"a tree schedule is widths per depth such as 4,2,1, or auto[:B]; got {tree!r}") \
                from None
    if not tree or any(w < 1 for w in tree):
        raise ValueError(f"a tree schedule needs widths >= 1 per depth, got {tree!r}")
    return FixedSchedule(list(tree))
