"""The engine: `Sparsifier` and the parts it is composed of, each doing one thing.

==================  ==========================================================================
``sparsifier.py``   `Sparsifier`, the one public entry: swap or adopt the layers, attach to an
                    optimizer, run the parts below in order, checkpoint state
``schedule.py``     `Schedule`: step -> phase, threshold ramp, decay factor (a pure function of
                    the config, ``max_steps`` and the step)
``rules.py``        the per-step gradient rules (NaN policy, decays, ``flip_moments``) and the
                    method-specific facts the engine needs (decay rate, S-STE's beta)
``metrics.py``      flip rate, zero fraction, the weights' NaN/inf check after the update
``prune_at.py``     ``prune_at``: Wanda's calibration hooks and the one-off pruning
``state.py``        the resume fingerprint (`MATH_FIELDS`) and its checks
``hooks.py``        the optimizer's step pre/post hooks (closures included)
``_dist.py``        rank, FSDP2 shard sums, optimizer unwrapping
==================  ==========================================================================
"""

from .sparsifier import Sparsifier
from .state import MATH_FIELDS

__all__ = ["Sparsifier", "MATH_FIELDS"]
