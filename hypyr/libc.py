"""The C library, loaded once for every layer (a leaf module: it imports nothing from hypyr).

:func:`function` hands each caller its own foreign-function object, so that one module's
``argtypes`` never change another's calls to the same symbol (attributes of a ``CDLL`` are
shared).  Failures return -1 with ``ctypes.get_errno()`` set (``use_errno``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

__all__ = ["LIBC", "IOV_MAX", "function", "optional_function"]

LIBC = ctypes.CDLL(None, use_errno=True)

IOV_MAX = 1024  # Linux UIO_MAXIOV: at most this many buffers per preadv/pwritev/readv/writev


def function(name: str, argtypes: list[Any] | None = None, restype: Any = ctypes.c_int) -> Callable[..., Any]:
    """libc's ``name`` as a new ctypes function with these argument and result types (``argtypes``
    None: unchecked, as for the variadic ``prctl``/``syscall``); AttributeError if libc lacks it."""
    fn = LIBC[name]
    if argtypes is not None:
        fn.argtypes = argtypes
    fn.restype = restype
    return fn


def optional_function(name: str, argtypes: list[Any] | None = None,
                      restype: Any = ctypes.c_int) -> Callable[..., Any] | None:
    """:func:`function`, or None if this libc lacks ``name`` (the caller has a fallback)."""
    try:
        return function(name, argtypes, restype)
    except AttributeError:
        return None
