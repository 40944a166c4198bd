"""Fast paths (Triton, CUDA) of the methods' reference functions, and the one dispatch between them.

A method file (``methods/<name>.py``) holds the method's rule in plain torch. Where a GPU kernel runs
part of that rule faster, the reference function is decorated with :func:`fast_path`::

    @fast_path("kernels.divprune:greedy_maxmin")
    def greedy_maxmin(dist, k):  # the rule, in torch
        ...

and ``kernels/divprune.py`` defines ``greedy_maxmin(dist, k)``: the same signature, the same result
(tested equal: under Triton's CPU interpreter, and bit for bit on the GPU). Calling the decorated
function runs the kernel when :func:`available` says its tensors can take one, and the reference
otherwise. A kernel may still decline a call it cannot take (a shape past its limits) by returning
``NotImplemented``; the reference then runs. Kernel modules are imported on first use only, so
nothing here imports Triton unless a kernel is about to run.

``f.reference`` is the torch rule, ``f.kernel`` the fast path (:func:`reference_only` sends every call
in a block to the references), ``f.run(backend, ...)`` a method's ``backend`` option: ``"auto"`` (the dispatch), ``"torch"`` (the reference) or the kernel's name
(``"triton"``, ``"cuda"``; refused with a clear error where it cannot run).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
from typing import Any, Callable

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, set before Triton is imported; tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_REFERENCE_ONLY = False


@contextlib.contextmanager
def reference_only():
    """Within the block every dispatch runs the reference (tests and timing baselines compare against it)."""
    global _REFERENCE_ONLY
    prev, _REFERENCE_ONLY = _REFERENCE_ONLY, True
    try:
        yield
    finally:
        _REFERENCE_ONLY = prev


def available(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = FLOATS, nvrtc: bool = False) -> bool:
    """Whether ``tensors`` can take a kernel: the one check every fast path goes through.

    All of them in ``dtypes``, on CUDA (Triton kernels: or on the CPU under Triton's interpreter), the
    toolchain present (Triton; ``nvrtc``: torch's NVRTC wrapper ``torch.cuda._compile_kernel``, a private
    API, hence the check), and not inside a ``torch.compile`` trace (a traced forward keeps ATen's ops,
    which the compiler fuses).
    """
    if not tensors or _REFERENCE_ONLY or torch.compiler.is_compiling():
        return False
    if any(t.dtype not in dtypes for t in tensors):
        return False
    if nvrtc:
        return all(t.is_cuda for t in tensors) and hasattr(torch.cuda, "_compile_kernel")
    if not all(t.is_cuda or (t.device.type == "cpu" and interpreting()) for t in tensors):
        return False
    return _has_triton()


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class FastPath:
    """A reference function and its kernel: call it like the reference (see the module docstring).

    Parameters
    ----------
    reference : callable
        The torch rule.
    kernel : str
        ``"module:function"`` of the fast path (same signature).
    on : tuple of str
        Arguments whose tensors :func:`available` checks (default: the first argument).
    dtypes : tuple of torch.dtype
        Dtypes the kernel takes.
    auto_dtypes : tuple of torch.dtype, optional
        Dtypes ``backend="auto"`` sends to the kernel (default: ``dtypes``), where the reference is
        preferred for the others.
    nvrtc : bool
        The kernel is CUDA C compiled by NVRTC (no interpreter).
    name : str
        The kernel's backend name (``"triton"``, ``"cuda"``).
    """

    def __init__(self, reference: Callable, kernel: str, on: tuple[str, ...] | None = None, dtypes=FLOATS,
                 auto_dtypes=None, nvrtc: bool = False, name: str = "triton") -> None:
        functools.update_wrapper(self, reference)
        self.reference = reference
        self.target = kernel
        self.signature = inspect.signature(reference)
        self.on = on or (next(iter(self.signature.parameters)),)
        self.dtypes, self.auto_dtypes, self.nvrtc, self.name = dtypes, auto_dtypes or dtypes, nvrtc, name

    @functools.cached_property
    def kernel(self) -> Callable:
        module, fn = self.target.split(":")
        return getattr(importlib.import_module(module), fn)

    def takes(self, *args, auto: bool = True, **kwargs) -> bool:
        """Whether a call with these arguments goes to the kernel (before the kernel's own shape limits)."""
        bound = self.signature.bind_partial(*args, **kwargs)
        tensors = [t for name in self.on for t in _tensors(bound.arguments.get(name))]
        return available(*tensors, dtypes=self.auto_dtypes if auto else self.dtypes, nvrtc=self.nvrtc)

    def __call__(self, *args, **kwargs):
        return self.run("auto", *args, **kwargs)

    def run(self, backend: str, *args, **kwargs):
        """``backend``: ``"auto"``, ``"torch"`` or :attr:`name` (the kernel, or an error saying why it cannot run)."""
        if backend == "torch":
            return self.reference(*args, **kwargs)
        if backend == "auto":
            if not self.takes(*args, **kwargs):
                return self.reference(*args, **kwargs)
        elif backend == self.name:
            if not self.takes(*args, auto=False, **kwargs):
                from bench.errors import ConfigError

                where = "CUDA tensors and torch.cuda._compile_kernel (NVRTC)" if self.nvrtc else "CUDA tensors (or TRITON_INTERPRET=1) and Triton"
                raise ConfigError(f"{self.__name__}: backend={backend} needs {where}; use backend=auto or torch")
        else:
            raise ValueError(f"{self.__name__}: unknown backend {backend!r} (auto, torch, {self.name})")
        out = self.kernel(*args, **kwargs)
        return self.reference(*args, **kwargs) if out is NotImplemented else out


def fast_path(kernel: str, **options) -> Callable[[Callable], FastPath]:
    """Decorate a reference function with its kernel (``"module:function"``); options as :class:`FastPath`."""
    return lambda reference: FastPath(reference, kernel, **options)
