"""The engine's two optimizer hooks: the rules before the update, the bookkeeping after it.

PyTorch's own step hooks are used, so whatever the loop does before ``optimizer.step()``
(accumulation, `GradScaler`, clipping) stays the loop's business. A step that `GradScaler`
skips (inf gradients) never calls the optimizer, so neither hook runs.
"""

from __future__ import annotations

import warnings
from typing import Callable, List, Optional

import torch

__all__ = ["OptimizerHooks", "warn_until_attached"]


class OptimizerHooks:
    """Runs ``before()`` on the final gradients and ``after()`` after every ``optimizer.step()``.

    When the optimizer is stepped with a closure (as Lightning does), the gradients are final only
    once the closure has run its backward and clipping, so ``before()`` runs right after it."""

    def __init__(self, before: Callable[[], None], after: Callable[[], None]) -> None:
        self.before = before
        self.after = after
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._handles: list = []

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    def detach(self) -> None:
        """Remove the hooks (the optimizer is left exactly as it was found)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.optimizer = None

    def _pre(self, optimizer, args, kwargs):
        # `args` starts with the optimizer itself; a closure is the next positional or a keyword.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self.before()
            return None

        def closure_then_rules():
            loss = closure()  # Lightning: backward and clipping happen in here
            self.before()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_rules}
        return (args[0], closure_then_rules, *args[2:]), kwargs

    def _post(self, optimizer, args, kwargs) -> None:
        self.after()


def warn_until_attached(layer: torch.nn.Module, needs: List[str], attached: Callable[[], bool]):
    """Warn once, at the first training forward of ``layer`` without an attached optimizer, that the
    per-step rules ``needs`` (what each does without an engine) never run. Returns the hook's handle."""
    if not needs:
        return None

    def hook(module, args):
        if not (module.training and torch.is_grad_enabled()) or attached():
            return
        handle.remove()
        warnings.warn(
            f"Sparsifier is not attached to an optimizer, so its per-step rules do not run ({'; '.join(needs)}). "
            f"Call `sparsity.attach(optimizer)` after building the optimizer.",
            stacklevel=4,
        )

    handle = layer.register_forward_pre_hook(hook)
    return handle
