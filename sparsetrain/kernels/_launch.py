"""Launch a Triton kernel compiled on CUDA and interpreted on CPU, whatever the import order.

Triton decides between compiling and interpreting when ``@triton.jit`` decorates a function,
reading ``TRITON_INTERPRET`` at that moment; triton's own helpers (``tl.rand``'s Philox rounds) are
decorated when triton is first imported. Lightning imports triton, so in a test session triton is
usually imported long before a test module could set ``TRITON_INTERPRET=1``, and a plain
``@triton.jit`` kernel would then refuse CPU tensors. `DualKernel` therefore keeps the undecorated
function and picks per launch: interpreted for CPU tensors (or when ``TRITON_INTERPRET=1``),
compiled for CUDA tensors.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

__all__ = ["DualKernel", "launch_mode", "triton_importable"]

_LOCK = threading.Lock()


def triton_importable() -> bool:
    """True when ``import triton`` works (it is absent on macOS, Windows and aarch64 wheels)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def _interpret_requested() -> bool:
    """True when ``TRITON_INTERPRET=1`` asks for the interpreter everywhere (CUDA launches too).

    Triton >= 3.4 reads the variable through ``triton.knobs``; older releases read the environment
    directly in ``@triton.jit``. Both are read at call time here, as triton reads them when it
    decorates a function.
    """
    try:
        from triton import knobs
    except ImportError:  # Triton < 3.4 has no knobs module
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def launch_mode(*tensors) -> str:
    """``"interpreted"`` or ``"compiled"``: how a `DualKernel` launch on ``tensors`` would run.

    CPU tensors always go through the interpreter; CUDA tensors are compiled unless
    ``TRITON_INTERPRET=1`` is set (then triton's own ``tl.*`` helpers are interpreter objects,
    which a compiled kernel cannot call).
    """
    on_cpu = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in tensors)
    return "interpreted" if on_cpu or _interpret_requested() else "compiled"


@contextlib.contextmanager
def _nested_jit_runs_interpreted():
    """Let triton.language's ``@jit`` helpers run inside an interpreted kernel.

    When triton was imported without ``TRITON_INTERPRET=1`` its helpers (``tl.rand`` and the Philox
    rounds under it) are compile-only `JITFunction` objects whose ``__call__`` raises. For the
    duration of one interpreted launch we route such calls through the interpreter, which is what
    triton itself would have built had the variable been set at import time. Nothing changes when
    the helpers are already interpreted (the variable was set first), and the patch is undone on exit.
    """
    from triton.runtime import jit as _jit
    from triton.runtime.interpreter import InterpretedFunction

    original = _jit.JITFunction.__call__

    def _call_interpreted(self, *args, **kwargs):
        return InterpretedFunction(self.fn)(*args, **kwargs)

    with _LOCK:
        _jit.JITFunction.__call__ = _call_interpreted
        try:
            yield
        finally:
            _jit.JITFunction.__call__ = original


class DualKernel:
    """A Triton kernel body that launches compiled on CUDA and interpreted on CPU.

    Use like a ``@triton.jit`` kernel: ``kernel[grid](*args, **constexprs)``. The kernel body must
    not call other user ``@triton.jit`` functions (write helpers inline); ``tl.*`` is fine.

    Args:
        fn: the undecorated kernel function (module level, so triton can read its source).
    """

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled = None
        self._interpreted = None
        self.last_mode = None  # "compiled" or "interpreted": how the latest launch ran (for tests)

    def _pick(self, args) -> tuple:
        if launch_mode(*args) == "interpreted":
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction

                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted, True
        if self._compiled is None:
            from triton.runtime.jit import JITFunction

            self._compiled = JITFunction(self.fn)
        return self._compiled, False

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kernel, interpreted = self._pick(args)
            self.last_mode = "interpreted" if interpreted else "compiled"
            if not interpreted:
                return kernel[grid](*args, **kwargs)
            import triton.language as tl
            from triton.runtime.interpreter import InterpretedFunction

            if isinstance(tl.rand, InterpretedFunction):  # TRITON_INTERPRET=1 was set before import
                return kernel[grid](*args, **kwargs)
            with _nested_jit_runs_interpreted():
                return kernel[grid](*args, **kwargs)

        return launch
