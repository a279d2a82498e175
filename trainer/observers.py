"""The protocol through which the training loop lets others watch it, without knowing who they are.

At a step an observer wants, the loop calls `before_update` after the gradients are final (clipped)
and just before `optimizer.step()`, then `after_update` right after it, so the observer sees θ_t and
θ_{t+1} around the actual update. Observers must not touch the training graph, the gradients or
any RNG: training is bitwise the same with or without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.loop import Trainer


class Observer:
    """Base class with no-op defaults; override what you need."""

    name = "observer"

    def wants(self, step: int) -> bool:
        return False

    def before_update(self, step: int, trainer: Trainer) -> None:
        """Gradients of step `step` are ready; parameters are still θ_step."""

    def after_update(self, step: int, trainer: Trainer) -> None:
        """The optimizer has applied update `step`; parameters are θ_{step+1}."""

    def on_validation(self, step: int, val_loss: float) -> None:
        """A validation loss was measured before update `step`."""

    def flush(self) -> None:
        """Persist what is buffered (called before each checkpoint and at the end)."""

    def resume(self, step: int) -> None:
        """The run restarts at `step`: forget anything recorded at or after it."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
