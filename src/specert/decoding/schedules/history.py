"""What a certified schedule measured about a drafter: :class:`History`, kept by the drafter across generations."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from specert.decoding.schedules.settings import CERTIFIED


def _per_class() -> list[float]:
    return [0.0] * (CERTIFIED + 1)


@dataclass
class History:
    """What the certified schedules measured about one drafter, carried from one generation to the next (kept by the
    drafter: a server learns its drafter once, not per request). Public: a caller may build one to start from.

    =============  ===========================================================================================
    field          holds
    =============  ===========================================================================================
    ``kls``        KL(p || q) at the latest 512 verified positions (eps_hat and the class thresholds)
    ``reached``    per class 0 .. ``CERTIFIED``: the chain positions reached, each class's decayed on its own
    ``accepted``   ... and of those accepted (:meth:`record_position`)
    ``shares``     per class: the chain positions reached, all classes decayed together (their shares)
    ``steps``      (drafted, seconds outside the target's forward, seconds of the target's forward), latest 256
    ``yields``     (drafted, emitted) of the latest 64 chain steps (the rate lambda)
    ``verified``   n -> (V(n) as last measured, ``timed`` then): a length's cost outlives its timings
    ``timed``      the steps timed, ever
    =============  ===========================================================================================
    """

    kls: deque = field(default_factory=lambda: deque(maxlen=512))
    reached: list = field(default_factory=_per_class)
    accepted: list = field(default_factory=_per_class)
    shares: list = field(default_factory=_per_class)
    steps: deque = field(default_factory=lambda: deque(maxlen=256))
    yields: deque = field(default_factory=lambda: deque(maxlen=64))
    verified: dict = field(default_factory=dict)
    timed: int = 0

    def record_step(self, drafted: int, draft_seconds: float, verify_seconds: float) -> None:
        """A step's timings: ``draft_seconds`` outside the target's forward (drafting ``drafted`` tokens, the
        bookkeeping), ``verify_seconds`` the target's forward."""
        self.steps.append((drafted, draft_seconds, verify_seconds))
        self.timed += 1

    def record_position(self, level: int, accepted: bool, recent: int) -> None:
        """A chain position of class ``level`` reached, and whether its token was accepted. With g = 1 - 1/``recent``
        every count of the class is multiplied by g before it is added to (the position j positions ago of the class
        weighs g^j: about the latest ``recent`` count), and every class's share by g."""
        g = 1 - 1 / recent
        self.shares = [x * g for x in self.shares]
        self.shares[level] += 1
        self.reached[level] *= g
        self.accepted[level] *= g
        self.reached[level] += 1
        self.accepted[level] += accepted
