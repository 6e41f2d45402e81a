"""Which backends exist, why one is missing, and which one a call uses.

Backends (DESIGN.md): ``"reference"`` (pure PyTorch, always there), ``"cpp"`` (C++ CPU
kernels of the extension ``unirep_kernels._C``), ``"cuda"`` (its CUDA kernels) and
``"triton"``. A call picks one with, in order of precedence, the ``backend=`` keyword, the
innermost ``with use_backend(name):`` block, the ``UNIREP_BACKEND`` environment variable,
and finally ``"auto"``: the fastest backend built for the input's device.

:data:`BACKENDS` is the dispatch table: one :class:`Backend` entry per backend says where
its compiled ops live (a ``torch.ops`` namespace with the signatures of ``csrc/ops.cpp``),
what registers them, which devices it runs on and whether it is built. Adding a backend is
adding an entry; :mod:`unirep_kernels.ops` runs whichever entry a call resolves to.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

_extension = None
_extension_error: Optional[str] = None


def _load_extension() -> None:
    global _extension, _extension_error
    try:
        from unirep_kernels import _C  # noqa: F401  (registers torch.ops.unirep.*)

        _extension = _C
    except Exception as exc:  # ImportError, or an undefined symbol from an ABI mismatch
        _extension_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "unirep_kernels: the compiled extension unirep_kernels._C could not be loaded "
            f"({_extension_error}); falling back to the pure-PyTorch reference backend. "
            "Build it with `pip install --no-build-isolation .`.",
            RuntimeWarning,
            stacklevel=3,
        )


_load_extension()


def extension_loaded() -> bool:
    """True when unirep_kernels._C loaded and torch.ops.unirep.* exist."""
    return _extension is not None


_TRUE_STRINGS = ("1", "true", "on", "yes", "y")  # what triton accepts as true, in any case


def triton_interpreting() -> bool:
    """True when Triton kernels are interpreted (``TRITON_INTERPRET=1``: numpy, on CPU tensors).

    The one test of it: triton's own setting (``triton.knobs.runtime.interpret``, which
    follows the environment variable and what a program sets) once triton is imported,
    else the environment variable read as triton reads it. Never imports triton."""
    runtime = getattr(getattr(sys.modules.get("triton"), "knobs", None), "runtime", None)
    if runtime is not None:
        return bool(runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE_STRINGS


class BackendUnavailableError(RuntimeError):
    """The backend asked for is not built or installed here (the message says why)."""


@dataclass(frozen=True)
class Backend:
    """One entry of the dispatch table.

    Attributes:
        name: what ``backend=`` takes.
        namespace: the ``torch.ops`` namespace of its compiled ops, or None for the
            pure-PyTorch :mod:`unirep_kernels.reference`.
        load: imports what registers ``namespace`` (None: loaded with the package).
        devices: the device types whose tensors it runs on (``"*"``: any); every backend
            also takes meta tensors (shapes only, from the ops' fake kernels).
        extra_devices: device types it runs on now beyond ``devices`` (triton: cpu under
            its interpreter); read only for a device not in ``devices``.
        auto: the device types on which ``"auto"`` may choose it.
        built: ``(available, reason)``: what is built or installed, fixed for the process.
        usable: ``(available, reason)`` on this machine now, from ``built`` (None: ``built``
            itself); for :func:`backends` and error messages, never on the dispatch path.
    """

    name: str
    namespace: Optional[str]
    load: Optional[Callable[[], None]]
    devices: Tuple[str, ...]
    auto: Tuple[str, ...]
    built: Tuple[bool, str]
    usable: Optional[Callable[[Tuple[bool, str]], Tuple[bool, str]]] = None
    extra_devices: Optional[Callable[[], Tuple[str, ...]]] = None

    def runs_on(self, kind: str) -> bool:
        """Whether it runs on tensors of device type ``kind``."""
        if kind in self.devices or "*" in self.devices or kind == "meta":
            return True
        return self.extra_devices is not None and kind in self.extra_devices()

    def status(self) -> Tuple[bool, str]:
        """``(available, reason)`` on this machine now."""
        return self.built if self.usable is None else self.usable(self.built)

    def ops(self):
        """The ``torch.ops`` namespace of its compiled ops (registered on first use)."""
        if self.load is not None:
            self.load()
        return getattr(torch.ops, self.namespace)


def _extension_built(needs_cuda: bool) -> Tuple[bool, str]:
    if _extension is None:
        return False, f"extension not loaded ({_extension_error})"
    if needs_cuda and not getattr(_extension, "with_cuda", False):
        return False, "unirep_kernels._C was built without CUDA kernels"
    return True, ("CUDA kernels from unirep_kernels._C" if needs_cuda else "C++ CPU kernels from unirep_kernels._C")


def _triton_installed() -> Tuple[bool, str]:
    """Found without importing it (importing triton takes a while; it is loaded on first use)."""
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        found = False
    return (True, "triton is installed") if found else (False, "triton is not installed")


def _load_triton() -> None:
    try:
        from . import triton  # noqa: F401  (registers torch.ops.unirep_triton.*)
    except ImportError as exc:
        raise BackendUnavailableError(f"backend 'triton' is not available: triton failed to import "
                                      f"({type(exc).__name__}: {exc})") from exc


def _cuda_usable(built: Tuple[bool, str]) -> Tuple[bool, str]:
    if built[0] and not torch.cuda.is_available():
        return False, "built with CUDA kernels, but no CUDA device is available"
    return built


def _triton_usable(built: Tuple[bool, str]) -> Tuple[bool, str]:
    if not built[0]:
        return built
    try:
        import triton
    except Exception as exc:  # a broken installation
        return False, f"triton failed to import ({type(exc).__name__}: {exc})"
    version = getattr(triton, "__version__", "?")
    if not hasattr(torch.library, "custom_op"):
        return False, f"torch {torch.__version__} lacks torch.library.custom_op, which the Triton ops need"
    if triton_interpreting():
        return True, (f"Triton {version} kernels under TRITON_INTERPRET=1: interpreted on CPU tensors "
                      "(slow; for tests)")
    if torch.cuda.is_available():
        return True, f"Triton {version} kernels on CUDA tensors"
    return False, (f"triton {version} is installed but no CUDA device is available (set TRITON_INTERPRET=1 to "
                   "run its kernels on CPU tensors, slowly)")


# The dispatch table, fastest first: "auto" takes the first built entry for the device.
# Everything a call reads from it is fixed when the package is imported, so torch.compile
# guards on constants and never recompiles because of it.
BACKENDS: Dict[str, Backend] = {b.name: b for b in (
    Backend("cpp", "unirep", None, ("cpu",), auto=("cpu",), built=_extension_built(False)),
    Backend("cuda", "unirep", None, ("cuda",), auto=("cuda",), built=_extension_built(True), usable=_cuda_usable),
    Backend("triton", "unirep_triton", _load_triton, ("cuda",), auto=("cuda",), built=_triton_installed(),
            usable=_triton_usable, extra_devices=lambda: ("cpu",) if triton_interpreting() else ()),
    Backend("reference", None, None, ("*",), auto=("*",), built=(True, "pure PyTorch; always available")),
)}
NAMES = tuple(BACKENDS)
#: Backends ``"auto"`` may choose on each device type, in the order it tries them (fastest first).
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    kind: tuple(b.name for b in BACKENDS.values() if kind in b.auto or "*" in b.auto) for kind in ("cpu", "cuda")}


def backends() -> Dict[str, Tuple[bool, str]]:
    """``{name: (available, reason)}`` for every backend on this machine now."""
    return {name: b.status() for name, b in BACKENDS.items()}


_override_stack: List[str] = []


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed calls on backend ``name`` (or ``"auto"``) unless a call names one."""
    _check_name(name)
    _override_stack.append(name)
    try:
        yield
    finally:
        _override_stack.pop()


def _check_name(name: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {name!r}")


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend name in force for a call (may be "auto"), before device resolution."""
    if backend is not None:
        name = backend
    elif _override_stack:
        name = _override_stack[-1]
    else:
        name = os.environ.get("UNIREP_BACKEND", "auto") or "auto"
    _check_name(name)
    return name


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The concrete backend that runs a call on ``device``; a clear error if it cannot.

    Meta tensors (shapes only) go to any backend; ``"auto"`` gives them the reference."""
    name = requested_backend(backend)
    kind = device.type
    if name == "auto":
        for candidate in BACKENDS.values():
            if (kind in candidate.auto or "*" in candidate.auto) and candidate.built[0]:
                return candidate.name
        return "reference"
    entry = BACKENDS[name]
    available, reason = entry.built
    if not available:
        raise BackendUnavailableError(f"backend {name!r} is not available: {reason}")
    if not entry.runs_on(kind):
        usable, reason = entry.status()
        if not usable:  # e.g. "cuda" with no CUDA device, "triton" on the CPU without its interpreter
            raise BackendUnavailableError(f"backend {name!r} is not available: {reason}")
        raise ValueError(f"backend {name!r} runs on {' or '.join(entry.devices)} tensors, but x is on {device}")
    return name
