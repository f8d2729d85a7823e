"""Learning-rate schedules: linear warmup, then cosine decay or warmup-stable-decay (WSD).

Both are pure functions of the step, so a resumed run needs no scheduler state beyond the step.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, peak: float, warmup: int, total: int, schedule: str = "cosine",
          min_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    floor = peak * min_ratio
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":  # hold the peak, then decay linearly over the last `decay_fraction` of steps
        decay_start = total - int(decay_fraction * total)
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return peak - (peak - floor) * progress
    raise ValueError(f"unknown schedule {schedule!r}")
