"""User-facing errors, and how the CLI classifies every failure into an exit code.

Exit codes of ``dyc``:

* 0 success;
* 1 bad input or environment: a ``DycError``, an OS error that the user's paths or the machine
  caused (no space left, read-only file system, permission denied, no such file, ...), a missing
  optional package (the message names what to install), a ``dyc verify`` above tolerance;
* 2 usage: bad options or arguments (click's own checks, and ``UsageError``: values dyc checks, such
  as ``--steps 0`` or an unknown sampler);
* 3 internal error: a bug in dyc (``DYC_DEBUG=1`` shows the traceback);
* 130 interrupted.

Every one of them is one line on stderr.
"""

from __future__ import annotations

import errno

EXIT_INPUT = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class DycError(Exception):
    """A user-facing error: bad input, a bad file, an impossible request.

    The CLI prints ``dyc: error: <message>`` on stderr and exits 1; it never shows a traceback
    for these.
    """


class UsageError(DycError):
    """A bad option or argument value that dyc checks itself (a click-level check would be one too).

    The CLI exits 2 for it, like for click's own usage errors; to library callers it is a DycError.
    """


class ChecksumMismatch(DycError):
    """A file's sha256 is not the one recorded for it (``path``, ``expected``, ``actual``)."""

    def __init__(self, message: str, path: str, expected: str, actual: str):
        super().__init__(message)
        self.path, self.expected, self.actual = path, expected, actual


# errno values that say something about the user's paths or the machine, not about dyc
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device: free some, or write elsewhere",
    errno.EDQUOT: "disk quota exceeded: free some space, or write elsewhere",
    errno.EFBIG: "file too large for this file system",
    errno.EROFS: "read-only file system: write elsewhere (-o)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.EISDIR: "is a directory",
    errno.EEXIST: "already exists",
    errno.ENOTEMPTY: "directory not empty",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system",
    errno.EIO: "input/output error (a failing disk or network file system)",
    errno.EXDEV: "cross-device link",
    errno.ETXTBSY: "text file busy",
    errno.EBUSY: "device or resource busy",
    errno.ENXIO: "no such device or address",
    errno.ENODEV: "no such device",
    errno.EPIPE: "broken pipe (the reader of the output went away)",
    errno.ENOMEM: "out of memory",
}


def os_error_reason(e: OSError) -> str:
    """What an OS error means, in a few words (without the paths)."""
    return _ENVIRONMENT_ERRNOS.get(e.errno) or e.strerror or type(e).__name__


def os_error_message(e: OSError) -> str | None:
    """One line for an OS error that the environment caused; None when it is not one (a bug)."""
    if e.errno not in _ENVIRONMENT_ERRNOS:
        return None
    what = _ENVIRONMENT_ERRNOS[e.errno]
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    where = " -> ".join(paths)
    return f"{where}: {what}" if where else what


# optional packages: top-level import name -> what to install
OPTIONAL_PACKAGES = {
    "onnx": "pip install 'dyc[onnx]'",
    "onnxruntime": "pip install 'dyc[onnx]' (or onnxruntime-gpu for CUDA)",
    "matplotlib": "pip install 'dyc[plot]'",
    "PIL": "pip install pillow (or: pip install 'dyc[plot]')",
    "sklearn": "pip install 'dyc[recipes]'",
    "diffusers": "pip install diffusers",
    "tensorrt": "pip install tensorrt",
    "tensorrt_rtx": "pip install 'dyc[tensorrt-rtx]'",
    "tensorrt_rtx_bindings": "pip install 'dyc[tensorrt-rtx]'",
    "triton": "pip install triton (comes with CUDA builds of torch)",
}


def missing_dependency(e: ImportError) -> DycError | None:
    """A DycError naming the package to install when ``e`` is about an optional package, else None."""
    top = (e.name or "").split(".")[0]
    if top not in OPTIONAL_PACKAGES:
        return None
    if isinstance(e, ModuleNotFoundError):
        return DycError(f"this needs the optional package {top!r}, which is not installed: {OPTIONAL_PACKAGES[top]}")
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return DycError(f"the installed {top!r} cannot be used ({first}): {OPTIONAL_PACKAGES[top]} "
                    "to install a working version")
