"""Optional inductor compilation of element-wise hot loops on CPU, with an eager fallback.

Some ops (the MVUE estimator, the proximal pruner's coordinate sweeps) are a few dozen element-wise
operations per entry. Eagerly each is a pass over memory plus ~10 us of dispatch; inductor fuses
them into one vectorised C++ loop. `Compiled` wraps such a function: built on first use, it
returns ``None`` (so the caller runs the eager version) when ``SPARSETRAIN_COMPILE=0`` is set or
when compiling failed for a reason the environment explains (no C++ toolchain, an unsupported
platform), in which case it warns once and stays eager for the rest of the process. Any other
error is a bug and propagates.

The first compilation in a process takes seconds to minutes (inductor's disk cache decides which).
`compile_in_background` moves it to a thread: until the thread is done, calls return ``None`` and
the caller runs eagerly, then they switch to the compiled function. Where the compiled and the
eager function give bitwise the same results (element-wise code does here; the prox tests check
it), the switch cannot change a result, only the time.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Callable, Optional, Sequence


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
        self._warming: Optional["_Warmup"] = None  # a background compile in flight (or just ended)

    @property
    def pending(self) -> bool:
        """True until the first compilation of this process has finished (or was turned off)."""
        w = self._warming
        return not self.disabled and (self.fn is None or (w is not None and w.thread.is_alive()))

    @property
    def compiling_in_background(self) -> bool:
        w = self._warming
        return w is not None and w.thread.is_alive()

    def wait_for_background(self) -> None:
        """Block until a background compile of this function (if any) has ended."""
        w = self._warming
        if w is not None:
            w.thread.join()

    def __call__(self, *args):
        if self.disabled:
            return None
        w = self._warming
        if w is not None:
            if w.thread is not threading.current_thread():
                if w.thread.is_alive():
                    return None  # still compiling in the background: the caller runs eagerly
                self._warming = None
                if w.error is not None:  # not an environment problem (those warned and disabled)
                    raise RuntimeError(f"{self.what}: the background compile failed") from w.error
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


class _Warmup:
    def __init__(self, work: Callable[[], None]) -> None:
        self.error: Optional[BaseException] = None
        self.work = work
        # A daemon: a process whose eager calls finish first exits without waiting for the compile.
        self.thread = threading.Thread(target=self._run, name="sparsetrain-compile", daemon=True)

    def _run(self) -> None:
        try:
            self.work()
        except BaseException as e:  # handed to the caller's thread by `Compiled.__call__`
            self.error = e


def compile_in_background(compiled: Sequence[Compiled], work: Callable[[], None]) -> bool:
    """Run ``work`` (calls of ``compiled`` on small example inputs, which compile them) in a
    daemon thread; meanwhile the other threads' calls of ``compiled`` return ``None`` (run
    eagerly). Returns False, starting nothing, when none of them is still to compile."""
    todo = [c for c in compiled if c.pending and c._warming is None]
    if not todo:
        return False
    w = _Warmup(work)
    for c in todo:
        c._warming = w
    w.thread.start()
    return True
