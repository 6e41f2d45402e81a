"""Which backends exist, why one is missing, and which one a call uses.

Backends (DESIGN.md): ``"reference"`` (pure PyTorch, always there), ``"cpp"`` (C++ CPU
kernels of the extension ``unirep_kernels._C``), ``"cuda"`` (its CUDA kernels) and
``"triton"``. A call picks one with, in order of precedence, the ``backend=`` keyword, the
innermost ``with use_backend(name):`` block, the ``UNIREP_BACKEND`` environment variable,
and finally ``"auto"``: the fastest backend built for the input's device.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import torch

NAMES = ("reference", "cpp", "cuda", "triton")

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


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels are interpreted (numpy, on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


_triton_import: Optional[Tuple[Optional[str], str]] = None  # (version or None, why not)


def _triton_version() -> Tuple[Optional[str], str]:
    global _triton_import
    if _triton_import is None:
        try:
            import triton

            _triton_import = (getattr(triton, "__version__", "?"), "")
        except ImportError:
            _triton_import = (None, "triton is not installed")
        except Exception as exc:  # a broken installation
            _triton_import = (None, f"triton failed to import ({type(exc).__name__}: {exc})")
    return _triton_import


def _triton_status() -> Tuple[bool, str]:
    """Not cached: it depends on TRITON_INTERPRET, which a process (the tests) may set later."""
    version, why_not = _triton_version()
    if version is None:
        return False, why_not
    if not hasattr(torch.library, "custom_op"):
        return False, f"torch {torch.__version__} lacks torch.library.custom_op, which the Triton ops need"
    if triton_interpreting():
        return True, (f"Triton {version} kernels under TRITON_INTERPRET=1: interpreted on CPU tensors "
                      "(slow; for tests)")
    if torch.cuda.is_available():
        return True, f"Triton {version} kernels on CUDA tensors"
    return False, (f"triton {version} is installed but no CUDA device is available (set TRITON_INTERPRET=1 to "
                   "run its kernels on CPU tensors, slowly)")


_status_cache: Optional[Dict[str, Tuple[bool, str]]] = None


def backends() -> Dict[str, Tuple[bool, str]]:
    """``{name: (available, reason)}`` for every backend on this machine.

    Computed once per process (availability does not change while it runs), except
    ``"triton"``, which follows ``TRITON_INTERPRET``.
    """
    global _status_cache
    if _status_cache is None:
        _status_cache = _compute_status()
    status = dict(_status_cache)
    status["triton"] = _triton_status()  # follows TRITON_INTERPRET
    return status


def _compute_status() -> Dict[str, Tuple[bool, str]]:
    status = {"reference": (True, "pure PyTorch; always available")}
    if _extension is None:
        status["cpp"] = (False, f"extension not loaded ({_extension_error})")
        status["cuda"] = (False, f"extension not loaded ({_extension_error})")
    else:
        status["cpp"] = (True, "C++ CPU kernels from unirep_kernels._C")
        if not getattr(_extension, "with_cuda", False):
            status["cuda"] = (False, "unirep_kernels._C was built without CUDA kernels")
        elif not torch.cuda.is_available():
            status["cuda"] = (False, "built with CUDA kernels, but no CUDA device is available")
        else:
            status["cuda"] = (True, "CUDA kernels from unirep_kernels._C")
    return status


# Backends that can run on each device type, fastest first: what "auto" chooses from.
AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}
_DEVICE_OF = {"cpp": "cpu", "cuda": "cuda"}  # backends tied to one device type

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
    if name != "auto" and name not in NAMES:
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
    """The concrete backend that runs a call on ``device``; a clear error if it cannot."""
    name = requested_backend(backend)
    status = _status_cache if _status_cache is not None else backends()
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        status = dict(status, triton=_triton_status())
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            if status[candidate][0]:
                return candidate
        return "reference"
    available, reason = status[name]
    if not available:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    tied = _DEVICE_OF.get(name)
    if tied is not None and tied != device.type:
        raise ValueError(f"backend {name!r} runs on {tied} tensors, but x is on {device}")
    if name == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(f"backend 'triton' runs on cuda tensors (or on cpu tensors under TRITON_INTERPRET=1), "
                         f"but x is on {device}")
    return name
