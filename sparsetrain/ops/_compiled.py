"""Optional inductor compilation of element-wise hot loops on CPU, with an eager fallback.

Some ops (the MVUE estimator, the proximal pruner's coordinate sweeps) are a few dozen element-wise
operations per entry. Eagerly each is a pass over memory plus ~10 us of dispatch; inductor fuses
them into one vectorised C++ loop. `Compiled` wraps such a function: built on first use, it
returns ``None`` (so the caller runs the eager version) when ``SPARSETRAIN_COMPILE=0`` is set or
when compiling failed for a reason the environment explains (no C++ toolchain, an unsupported
platform), in which case it warns once and stays eager for the rest of the process. Any other
error is a bug and propagates.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional


def _compile_errors() -> tuple:
    errors = [OSError, ImportError, NotImplementedError]
    try:  # dynamo wraps a failing backend (inductor without a C++ compiler...) in these
        from torch._dynamo.exc import BackendCompilerFailed, Unsupported

        errors += [BackendCompilerFailed, Unsupported]
    except ImportError:
        pass
    return tuple(errors)


COMPILE_ERRORS = _compile_errors()


class Compiled:
    """``Compiled(fn, what)(*args)``: ``torch.compile(fn, dynamic=True)(*args)``, or ``None`` when
    compilation is off or unavailable here (the caller then runs ``fn`` eagerly)."""

    def __init__(self, fn: Callable, what: str, slowdown: str):
        self.source = fn
        self.what = what  # names the op in the warning
        self.slowdown = slowdown  # what running eagerly costs, for the warning
        self.fn: Optional[Callable] = None
        self.disabled = os.environ.get("SPARSETRAIN_COMPILE", "1") == "0"

    def __call__(self, *args):
        if self.disabled:
            return None
        if self.fn is None:
            import torch

            self.fn = torch.compile(self.source, dynamic=True)
        try:
            return self.fn(*args)
        except COMPILE_ERRORS as e:
            self.disabled = True
            warnings.warn(
                f"{self.what}: torch.compile failed here ({type(e).__name__}: {str(e)[:200]}); it runs eagerly "
                f"from now on ({self.slowdown}). Set SPARSETRAIN_COMPILE=0 to skip the attempt.",
                stacklevel=3,
            )
            return None
