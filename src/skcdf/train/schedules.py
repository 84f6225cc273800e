"""The per-epoch schedules of SPEC §2: the learning rate and the weight of the unsupervised loss.

(The third, the unlabeled balanced mask's keep probabilities, lives with the masks in
:mod:`skcdf.train.balance`.)
"""

from __future__ import annotations

import math


def poly_lr(base_lr: float, epoch: int, epochs: int, power: float = 0.9) -> float:
    """lr = base · (1 − epoch/epochs)^power, for the 0-based epoch about to run."""
    return base_lr * (1.0 - epoch / epochs) ** power


def rampup_weight(lambda_u: float, epoch: int, rampup_epochs: int) -> float:
    """λ(t) = λ_u · exp(−5 (1 − t/T)²), t = epoch clipped to T; T = 0 means no ramp-up."""
    if rampup_epochs == 0:
        return lambda_u
    phase = 1.0 - min(epoch, rampup_epochs) / rampup_epochs
    return lambda_u * math.exp(-5.0 * phase * phase)
