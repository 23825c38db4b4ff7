"""``prune_at``: W <- the N:M pruned W, once, right before the first sparse step.

With ``prune_method="wanda"`` the score is ``|W_ij| * ||x_j||``: forward pre-hooks sum ``x_j^2``
over the training inputs of the ``prune_calibration_steps`` steps before the switch (validation
batches are not calibration data). Under data parallelism every rank prunes with the same sums.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..config import SparsityConfig
from ..nn.linear import SparseLinear, local_tensor

__all__ = ["PruneAt"]

log = logging.getLogger(__name__)

Layers = Sequence[Tuple[str, SparseLinear]]


class PruneAt:
    """The calibration hooks and the one-off pruning of ``prune_at``."""

    def __init__(self, config: SparsityConfig, layers: Layers) -> None:
        self.config = config
        self.layers = list(layers)
        self.sums: Dict[str, torch.Tensor] = {}  # Wanda's sum of x_j^2 per sparse layer
        self._hooks: list = []

    def update_hooks(self, step: int, window: Tuple[int, int]) -> None:
        """Hook the layers' inputs while step ``step`` lies in the calibration ``window``."""
        start, end = window
        want = self._pruner().inputs == "input_norms" and start <= step < end
        if want and not self._hooks:
            self._hooks = [layer.register_forward_pre_hook(self._hook(name)) for name, layer in self.layers]
        elif not want:
            self.remove_hooks()

    def _pruner(self):
        from ..pruning.registry import PRUNERS  # the one table `prune` reads too

        return PRUNERS[self.config.prune_method]

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _hook(self, name: str):
        def hook(module, args):
            if not (module.training and torch.is_grad_enabled()):
                return  # validation batches are not calibration data
            with torch.no_grad():
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, in)
                sq = (x * x).sum(0)
                acc = self.sums.get(name)
                self.sums[name] = sq if acc is None else acc + sq
        return hook

    @torch.no_grad()
    def prune(self, step: int) -> None:
        """Prune every layer's weight in place (a mid-training pruner of the registry) and drop the statistics."""
        cfg = self.config
        pruner = self._pruner()
        norms = pruner.inputs == "input_norms"
        if norms:
            missing = [name for name, _ in self.layers if name not in self.sums]
            if missing:
                raise RuntimeError(
                    f"`prune_method`={cfg.prune_method!r} saw no training input for {', '.join(missing[:3])} in the "
                    f"{cfg.prune_calibration_steps} step(s) before `prune_at`; the layers must run in training mode."
                )
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # Every data-parallel rank prunes with the same statistics: one all-reduce for all layers.
                flat = torch.cat([self.sums[name] for name, _ in self.layers])
                torch.distributed.all_reduce(flat)
                parts = flat.split([self.sums[n].numel() for n, _ in self.layers])
                self.sums = {name: part for (name, _), part in zip(self.layers, parts)}
        for name, layer in self.layers:
            w = local_tensor(layer.weight.detach())
            # The input norms stand in for the Gram matrix: a mid-training pruner reads its diagonal only.
            pruned, _ = pruner.prune(w, torch.diag(self.sums[name]) if norms else None, cfg.n, cfg.m)
            w.copy_(pruned.to(w.dtype))
        self.sums = {}
        log.info("Sparsifier: pruned %d layer(s) to %d:%d (%s) at optimizer step %d",
                 len(self.layers), cfg.n, cfg.m, cfg.prune_method, step)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.sums.items()}

    def load_state_dict(self, sums: Optional[Dict[str, torch.Tensor]]) -> None:
        devices = {name: layer.weight.device for name, layer in self.layers}
        self.sums = {name: v.to(devices[name]) if name in devices else v for name, v in (sums or {}).items()}
