"""Files in and out: regular files only, each read once, written atomically; the one sha256 helper.

* Reading: ``open_regular`` opens without blocking and checks ``fstat`` before any read, so a FIFO,
  a device or a directory given as a file is one clear error instead of a hang. ``read_bytes``
  reads a file once; callers check its checksum on those bytes and use those same bytes (nothing
  is reopened by path after the check, so a concurrent rewrite cannot slip in between).
* Writing: ``atomic_output`` writes a temp file beside the target, fsyncs it and renames it into
  place: a reader sees the old file or the whole new one, a failure (disk full, kill) leaves the
  old one. It refuses to replace anything that is not a regular file (``/dev/null`` stays a device).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import DycError, os_error_reason

_CHUNK = 1 << 24


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a regular file (streamed: GB-sized weights are never held whole)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def stream_sha256(path: str | os.PathLike, sink, limit: int, what: str = "file", chunk: int = 1 << 26
                  ) -> tuple[int, str]:
    """Feed a regular file to ``sink(offset, memoryview)`` in chunks of at most ``limit`` bytes in all.

    Returns (bytes read, sha256 of them); more bytes than ``limit`` in the file reads as ``limit + 1``.
    """
    h = hashlib.sha256()
    buf = bytearray(min(chunk, max(limit, 1)))
    view, off = memoryview(buf), 0
    with open_regular(path, what) as f:
        try:
            while (k := f.readinto(buf)) > 0:
                if off + k > limit:
                    return limit + 1, h.hexdigest()
                h.update(view[:k])
                sink(off, view[:k])
                off += k
        except OSError as e:
            raise DycError(f"{path}: cannot read {what} ({os_error_reason(e)})") from None
    return off, h.hexdigest()


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path: str | os.PathLike, what: str = "file") -> IO[bytes]:
    """Open a regular file for reading; DycError for a missing path, a directory, FIFO or device."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO with no writer would block forever; it is refused below anyway
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DycError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DycError(f"{path}: is a directory, not a {what}") from None
    except PermissionError:
        raise DycError(f"{path}: permission denied (cannot read this {what})") from None
    except OSError as e:
        raise DycError(f"{path}: cannot open this {what} ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _kind(st.st_mode)
            raise DycError(f"{path}: is {kind}, not a {what}" if kind.startswith("a ")
                           else f"{path}: {kind}; give a {what}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | os.PathLike, what: str = "file") -> bytes:
    """The whole content of a regular file, read once."""
    with open_regular(path, what) as f:
        try:
            return f.read()
        except OSError as e:  # EIO on a failing disk, EISDIR on odd file systems
            raise DycError(f"{path}: cannot read this {what} ({e.strerror})") from None


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DycError(f"{path}: not a text {what} (not UTF-8 at byte {e.start})") from None


def check_input_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Fail early (before minutes of work) if ``path`` cannot be an input file."""
    with open_regular(path, what):
        pass
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def output_target(path: str | os.PathLike, what: str = "output file") -> Path:
    """Where an output to ``path`` goes: a symlink's target; refuses to replace a non-regular file."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise DycError(f"{path}: a component of the path is not a directory") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise DycError(f"{path}: exists and is {_kind(st.st_mode)}; refusing to replace it with the {what}")
    if not path.parent.exists():
        raise DycError(f"{path.parent}: no such directory (for the {what} {path.name})")
    if not path.parent.is_dir():
        raise DycError(f"{path.parent}: is not a directory (for the {what} {path.name})")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, what: str = "output file") -> Iterator[IO[bytes]]:
    """A binary file object whose content replaces ``path`` atomically when the block ends without error.

    On any error (disk full, read-only file system, an exception in the block) the temp file is
    removed and ``path`` is left as it was; the OSError is raised as a DycError naming ``path``.
    """
    path = output_target(path, what)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e, what) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; an output is an ordinary file
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, e, what) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_error(path: Path, e: OSError, what: str) -> DycError:
    return DycError(f"{path}: cannot write the {what} ({os_error_reason(e)}); nothing was changed there")


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "output file") -> Path:
    with atomic_output(path, what) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "output file") -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), what)


def make_output_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create a directory (and its parents) for outputs; one clear error when that is impossible."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DycError(f"{path}: exists and is not a directory (for the {what})")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DycError(f"{path}: a component of the path exists and is not a directory") from None
    except NotADirectoryError:
        raise DycError(f"{path}: a component of the path is not a directory") from None
    except OSError as e:
        raise _write_error(path, e, what) from None
    return path


# ---- atomic directory swaps (Linux renameat2) --------------------------------------------------
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_renameat2_fn = None


def _renameat2():
    """libc's renameat2, or None where there is none (not Linux, or glibc < 2.28)."""
    global _renameat2_fn
    if _renameat2_fn is None:
        import ctypes

        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (AttributeError, OSError):
            fn = False
        _renameat2_fn = fn
    return _renameat2_fn or None


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False when the system or file system does not support the flag."""
    import ctypes

    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step; False where RENAME_EXCHANGE is not available."""
    return _rename2(Path(a), Path(b), _RENAME_EXCHANGE)


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> bool:
    """Rename unless ``dst`` exists (FileExistsError then); False where RENAME_NOREPLACE is not available."""
    return _rename2(Path(src), Path(dst), _RENAME_NOREPLACE)
