"""Training drafters for a target from its own outputs (`specert distill`): a draft head over the target's hidden
states (:mod:`specert.drafters.head`, ``architecture="head"``) or the target itself with its least useful layers
removed and healed (:mod:`specert.drafters.pruned`, ``"pruned"``). Both learn from the same cache.

=====================  =========================================================================================
module                 what it holds
=====================  =========================================================================================
:mod:`.config`         :class:`DistillConfig`, the options of a run, and their defaults
:mod:`.data`           phases 1 and 2: the texts (or the target's own answers to them), the draft vocabulary, the
                       cache of the target's outputs on disk, read back as :class:`~.data.Texts` batches
:mod:`.objectives`     the objectives (KL(p || q), its certificate hinge, the reachable term), the training-time
                       test, and the losses of a head and of a pruned student
:mod:`.pruning`        which layers a pruned drafter keeps (block influence)
:mod:`.training`       phase 3: the training loop with checkpoints and resume, the held-out report,
                       :func:`run_distill` (all three phases)
=====================  =========================================================================================
"""

from specert.train.config import DistillConfig
from specert.train.training import run_distill

__all__ = ["DistillConfig", "run_distill"]
