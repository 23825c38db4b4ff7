"""The schedule: which phase an optimizer step trains in, and the ramps' values at that step.

A pure function of the config, the run's length and the step, so a resume needs only the step
(as nanoGPT's learning-rate schedule). Steps are 0-based: step ``k`` is the optimizer step taken
after ``k`` steps already happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import SCHEDULE_FIELDS, SparsityConfig

__all__ = ["Schedule", "SCHEDULE_FIELDS"]


@dataclass(frozen=True)
class Schedule:
    """The phase and ramps of ``config`` over a run of ``max_steps`` optimizer steps.

    Example:
        >>> s = Schedule(SparsityConfig(method="ste", dense_warmup=2, dense_finetune_from=0.5), max_steps=10)
        >>> [s.phase_at(k) for k in (0, 2, 5)]
        ['dense', 'sparse', 'dense']
    """

    config: SparsityConfig
    max_steps: Optional[int] = None

    def steps(self, field: str) -> Optional[int]:
        """A schedule field in optimizer steps (an int as it is, a fraction times ``max_steps``)."""
        d = getattr(self.config, field)
        if d is None or isinstance(d, int):
            return d
        if self.max_steps is None:
            raise ValueError(
                f"`{field}`={d!r} is a fraction of the run's length: pass `max_steps` to "
                f"`Sparsifier.attach(optimizer, max_steps=...)`, or give the step as an int."
            )
        return int(round(d * self.max_steps))

    def validate(self) -> None:
        """Every field resolvable (a fraction needs ``max_steps``) and at least one sparse step."""
        for field in SCHEDULE_FIELDS:
            self.steps(field)
        dense_from = self.dense_from_step()
        if dense_from is not None and self.sparse_from_step() >= dense_from:
            raise ValueError(
                f"The dense warm-up / `prune_at` ends at step {self.sparse_from_step()}, not before "
                f"`dense_finetune_from` (step {dense_from}): no step would train sparse."
            )

    def dense_from_step(self) -> Optional[int]:
        """The optimizer step where dense fine-tuning starts (None: never)."""
        return self.steps("dense_finetune_from")

    def sparse_from_step(self) -> int:
        """The first optimizer step trained sparse (after ``dense_warmup`` or at ``prune_at``; 0 otherwise)."""
        return self.steps("dense_warmup") or self.steps("prune_at") or 0

    def phase_at(self, step: int) -> str:
        """``"sparse"`` or ``"dense"``: the phase optimizer step ``step`` trains in."""
        if not self.config.trains_sparse or step < self.sparse_from_step():
            return "dense"
        dense_from = self.dense_from_step()
        if dense_from is not None and step >= dense_from:
            return "dense"
        return "sparse"

    def prunes_at(self, step: int) -> bool:
        """True when ``prune_at`` prunes the weights once, right before step ``step`` trains."""
        return self.config.prune_at is not None and step == self.sparse_from_step()

    def _progress(self, field: str, step: int) -> float:
        """``min(1, (step - s0) / K)`` for a ramp of ``K`` = ``field`` steps from the first sparse step s0."""
        k = self.steps(field)
        if k is None:
            return 1.0
        return min(1.0, max(0, step - self.sparse_from_step()) / max(k, 1))

    def ramp_at(self, step: int) -> float:
        """S-STE's threshold ramp ``r`` in [0, 1] at step ``step`` (1 without ``threshold_ramp``)."""
        return self._progress("threshold_ramp", step)

    def decay_scale_at(self, step: int) -> float:
        """The factor on SR-STE's decay and ``masked_decay`` at step ``step`` (1 without ``decay_ramp``)."""
        return self._progress("decay_ramp", step)

    def lr_factor_at(self, step: int) -> float:
        """The factor on the learning rate of step ``step``: ``min(1, (step - s0 + 1) / K)`` during
        ``lr_rewarm`` (``K`` steps from the first sparse step ``s0``; the first is not a zero-lr step), 1 otherwise."""
        k, s0 = self.steps("lr_rewarm"), self.sparse_from_step()
        if k is None or step < s0 or self.phase_at(step) != "sparse":
            return 1.0
        return min(1.0, (step - s0 + 1) / max(k, 1))

    def calibration_window(self) -> tuple:
        """``[start, end)``: the steps whose training inputs Wanda's ``prune_at`` statistics sum."""
        if self.config.prune_at is None:
            return 0, 0
        end = self.sparse_from_step()
        return max(0, end - self.config.prune_calibration_steps), end
