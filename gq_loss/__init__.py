"""gq-loss: the Gradient Quotient loss of *Learning ODIN* and faithful ODIN OOD detection.

Public API (all importable from the top level)::

    from gq_loss import GQLoss, gq_loss, class_gradient_norms      # training
    from gq_loss import odin_score, odin_perturb, msp_score, energy_score   # scores, per batch
    from gq_loss import ODINDetector, MSPDetector, EnergyDetector, MahalanobisDetector  # detectors
    from gq_loss import Detector, NotFittedError                    # their protocol
    from gq_loss import InputRangeWarning                           # inputs in 0-255, say
    from gq_loss import GQLossError         # a RuntimeError: gq-loss's translated refusals
    from gq_loss.metrics import ood_metrics                         # evaluation
"""

from __future__ import annotations

# The unreleased 1.0 that CHANGELOG.md describes ("1.0 API"); nothing has been published yet.
__version__ = "1.0.0.dev0"

from ._detector import Detector, NotFittedError
from ._errors import GQLossError
from ._validation import InputRangeWarning
from .functional import odin_perturb, odin_score
from .kernels import class_gradient_norms
from .loss import GQLoss, gq_loss
from .mahalanobis import MahalanobisDetector
from .odin import ODINDetector
from .scores import EnergyDetector, MSPDetector, energy_score, msp_score

__all__ = [
    "Detector",
    "EnergyDetector",
    "GQLoss",
    "GQLossError",
    "InputRangeWarning",
    "MSPDetector",
    "MahalanobisDetector",
    "NotFittedError",
    "ODINDetector",
    "__version__",
    "class_gradient_norms",
    "energy_score",
    "gq_loss",
    "msp_score",
    "odin_perturb",
    "odin_score",
]
