"""What a long run survives: bad steps are skipped and counted, a streak of them rolls back to the last
checkpoint, and SIGTERM or `--max-time` end the run with a checkpoint instead of losing work.

A step is bad when its loss (the mean over all ranks, so every rank judges alike) is NaN or inf, its
gradient norm is not finite, or its loss spikes: above `spike_factor` × the running mean of the good
steps' losses (an EMA, consulted once `SPIKE_WARMUP` good steps have set it). A bad step's update is
dropped (no optimizer step) and its batch is not replayed. `max_bad_steps` bad steps in a row mean the
weights themselves have gone wrong: the loop restores the last checkpoint's weights and optimizer,
keeps reading data from where it is (the batches that went wrong are not seen again, as PaLM did),
and multiplies the learning rate by `rollback_lr_factor` from then on. No periodic checkpoint is written
during a streak, and a streak right after a rollback goes one checkpoint further back (the update that
ruined the weights was judged by the loss before it, so a checkpoint may hold them); with none left
the run stops with an error.

SIGTERM (what schedulers and torchrun send before killing a job) only sets a flag; the loop finishes
the step, every rank agrees through the step's all-reduce, and they write a checkpoint and stop. So
does the `max_time` deadline (measured from this process's start of training).

Test hook: `NANOFORGE_TEST_NAN_STEPS="6,7,8"` makes the loss of those steps NaN, each once per process; a
step listed twice ("7,8,7,8") is NaN again when a rollback makes the run go through it again.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any

from nanoforge.errors import NanoforgeError

SPIKE_WARMUP = 10  # good steps before spikes are judged: the first losses fall too fast for a mean
EMA_DECAY = 0.9


@dataclass
class LossGuard:
    """Judges each step's loss and counts the bad ones; its state goes into every checkpoint."""

    spike_factor: float
    max_bad_steps: int
    rollback_lr_factor: float
    ema: float | None = None  # running mean of good losses
    good_steps: int = 0
    bad_in_row: int = 0
    skipped: int = 0  # bad steps in the whole run (rollbacks do not undo the count)
    rollbacks: int = 0
    rollbacks_in_row: int = 0  # rollbacks since the last good step: each goes one checkpoint further back
    lr_scale: float = 1.0  # multiplies the schedule's learning rate; lowered by each rollback

    def judge(self, loss: float, grad_norm: float) -> str | None:
        """None for a good step (its loss joins the running mean), else why it is bad: nonfinite | spike."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            reason: str | None = "nonfinite"
        elif (self.spike_factor and self.ema is not None and self.good_steps >= SPIKE_WARMUP
              and loss > self.spike_factor * self.ema):
            reason = "spike"
        else:
            reason = None
        if reason is None:
            self.ema = loss if self.ema is None else EMA_DECAY * self.ema + (1 - EMA_DECAY) * loss
            self.good_steps += 1
            self.bad_in_row = self.rollbacks_in_row = 0
        else:
            self.skipped += 1
            self.bad_in_row += 1
        return reason

    @property
    def must_roll_back(self) -> bool:
        return self.bad_in_row >= self.max_bad_steps

    def rolled_back(self, saved: dict[str, Any]) -> None:
        """After restoring a checkpoint whose guard state was `saved`: its running mean, this run's counts,
        and a lower learning rate than the one that went wrong."""
        self.ema, self.good_steps = saved.get("ema"), int(saved.get("good_steps", 0))
        self.bad_in_row = 0
        self.rollbacks += 1
        self.rollbacks_in_row += 1
        self.lr_scale *= self.rollback_lr_factor

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()
                if k not in ("spike_factor", "max_bad_steps", "rollback_lr_factor")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def injected_nan_steps() -> list[int]:
    """The steps whose loss the test hook turns into NaN, one entry per time (see the module docstring)."""
    raw = os.environ.get("NANOFORGE_TEST_NAN_STEPS", "")
    try:
        return [int(s) for s in raw.split(",") if s.strip()]
    except ValueError:
        raise NanoforgeError(f"NANOFORGE_TEST_NAN_STEPS: expected step numbers like 6,7,8, got {raw!r}") from None


class StopRequest:
    """SIGTERM or the `max_seconds` deadline, as seen by this process; a context manager that installs
    (and afterwards restores) the SIGTERM handler when it runs on the main thread."""

    def __init__(self, max_seconds: float | None) -> None:
        self.deadline = None if max_seconds is None else time.monotonic() + max_seconds
        self.sigterm = False
        self._previous: Any = None

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.sigterm = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def flags(self) -> tuple[float, float]:
        """(SIGTERM received, deadline passed) as 0/1, to be summed over the ranks."""
        late = self.deadline is not None and time.monotonic() >= self.deadline
        return float(self.sigterm), float(late)


class TrainingStopped(NanoforgeError):
    """The run ended early on request (SIGTERM or max_time) after writing a checkpoint."""

    def __init__(self, reason: str, step: int, checkpoint: str) -> None:
        self.reason, self.step, self.checkpoint = reason, step, checkpoint
        super().__init__(f"pretrain: stopped by {reason} after step {step}; checkpoint {checkpoint}; "
                         f"continue with --resume")
