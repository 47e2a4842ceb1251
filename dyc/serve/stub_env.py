"""The Python environment of Triton's Python-backend stub, the process PyTriton puts between Triton and us.

Two things about PyTriton 0.7's stub (Triton 2.51) need care:

* it links ``libpython3.X.so.1.0`` and takes the first on the loader's path, often the system's;
  under another patch release of Python (pyenv, a built Python under a venv) it then runs this
  interpreter's standard library on the other's builtins and the model fails to load (seen here:
  Debian's 3.11.2 library under pyenv's 3.11.7 stdlib, "'_thread.RLock' object has no attribute
  '_recursion_count'"). ``use_own_libpython`` puts this interpreter's library first.
* its pybind11 predates numpy 2: under numpy ≥ 2 every response tensor arrives empty (seen here:
  numpy 2.4 gives ``binary_data_size 0``; hence PyTriton's ``numpy<2`` pin). The stub ignores
  PYTHONPATH and takes the site-packages of the first ``python3`` on PATH, which PyTriton sets to
  this interpreter's environment. ``numpy1_stub_env`` builds a small venv whose site-packages puts
  a directory with numpy < 2 before this environment's own paths, and points PyTriton at it:
  the stub gets numpy 1, this process keeps its numpy 2.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import tempfile
from pathlib import Path

from ..errors import DycError


def _loader_path_first(libdir: str) -> None:
    """``libdir`` first on LD_LIBRARY_PATH (read by the processes PyTriton starts), once."""
    old = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir not in old.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{old}" if old else libdir


def use_own_libpython() -> None:
    """This interpreter's libpython first on LD_LIBRARY_PATH (read by the processes PyTriton starts)."""
    libdir, name = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and name and (Path(libdir) / name).is_file():
        _loader_path_first(libdir)


def find_server_libs() -> None:
    """The libraries of PyTriton's ``tritonserver`` (libcudart, libtritonserver, ...) on LD_LIBRARY_PATH.

    PyTriton looks for them beside its package only when it sits in a site-packages directory; installed
    anywhere else (``pip install --target DIR`` + PYTHONPATH) it takes itself for an editable install and
    points the server at a folder that does not exist, and ``tritonserver`` fails to load libcudart.
    """
    from pytriton.utils import distribution

    if distribution.get_libs_path().is_dir():
        return
    libs = distribution.get_root_module_path().parent / "nvidia_pytriton.libs"
    if not libs.is_dir():
        raise DycError(f"PyTriton's server libraries are missing (neither {distribution.get_libs_path()} nor {libs} "
                       "exists): reinstall nvidia-pytriton")
    _loader_path_first(str(libs))


def numpy_major(path: Path | None = None) -> int | None:
    """The major version of numpy installed in ``path`` (a site-packages-like directory), or of this process's."""
    if path is None:
        import numpy

        return int(numpy.__version__.split(".")[0])
    for info in path.glob("numpy-*.dist-info"):
        try:
            return int(info.name.split("-")[1].split(".")[0])
        except (IndexError, ValueError):
            continue
    return None


def numpy1_stub_env(numpy_dir: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """A venv for the stub: ``numpy_dir`` (holding numpy < 2) first, then this process's import paths.

    ``numpy_dir``: e.g. made with ``pip install --target DIR 'numpy<2'`` for this Python. Returns the
    venv's directory (under ``root``, a new temporary directory by default).
    """
    numpy_dir = Path(numpy_dir).resolve()
    major = numpy_major(numpy_dir)
    if major is None:
        raise DycError(f"--stub-numpy {numpy_dir}: no numpy in it (make it with pip install --target DIR 'numpy<2')")
    if major >= 2:
        raise DycError(f"--stub-numpy {numpy_dir}: holds numpy {major}.x; the stub needs numpy < 2")
    env = Path(tempfile.mkdtemp(prefix="dyc-triton-stub-", dir=root))
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = Path(getattr(sys, "_base_executable", None) or sys.executable)
    (env / "bin").mkdir()
    site = env / "lib" / f"python{ver}" / "site-packages"
    site.mkdir(parents=True)
    for name in ("python3", "python", f"python{ver}"):
        (env / "bin" / name).symlink_to(base)
    (env / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\n"
                                    f"version = {sys.version.split()[0]}\n")
    # .pth lines are appended to sys.path in order: numpy 1 before this environment's numpy 2
    paths = [str(numpy_dir)] + [p for p in sys.path if p and Path(p).is_dir() and p != str(numpy_dir)]
    (site / "_dyc_stub.pth").write_text("\n".join(paths) + "\n")
    return env


def point_pytriton_at(env: Path) -> None:
    """Make PyTriton start the stub with ``env``'s python first on PATH (it takes sys.exec_prefix otherwise)."""
    import pytriton.server.triton_server as ts

    ts.get_triton_python_backend_python_env = lambda: env


def prepare(stub_numpy: str | os.PathLike | None) -> Path | None:
    """Everything the stub needs before Triton starts; the stub venv made (to remove at exit), if any."""
    use_own_libpython()
    find_server_libs()
    if stub_numpy is None:
        if numpy_major() >= 2:
            raise DycError("this Python has numpy 2, whose arrays PyTriton 0.7's Python-backend stub receives "
                           "empty: give --stub-numpy DIR, a directory with numpy<2 for this Python "
                           "(pip install --target DIR 'numpy<2'), or run dyc serve where numpy<2 is installed")
        return None
    env = numpy1_stub_env(stub_numpy)
    point_pytriton_at(env)
    return env
