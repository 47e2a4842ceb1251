"""The stub's environment: its libpython and, under numpy 2, a venv whose numpy is < 2 (dyc/serve/stub_env.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from dyc.errors import DycError
from dyc.serve import stub_env


def fake_numpy(d: Path, version: str) -> Path:
    (d / "numpy").mkdir(parents=True)
    (d / "numpy" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    (d / f"numpy-{version}.dist-info").mkdir()
    return d


def test_stub_venv_puts_the_numpy_folder_first(tmp_path):
    np_dir = fake_numpy(tmp_path / "np1", "1.26.4")
    env = stub_env.numpy1_stub_env(np_dir, root=tmp_path)
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert (env / "bin" / "python3").resolve() == Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    assert "include-system-site-packages = false" in (env / "pyvenv.cfg").read_text()
    pth = (env / "lib" / f"python{ver}" / "site-packages" / "_dyc_stub.pth").read_text().split()
    assert pth[0] == str(np_dir.resolve()) and len(pth) > 1
    # the venv's python (what the stub's embedded interpreter becomes) imports numpy from that folder first
    # and still finds this environment's packages (pytriton's proxy needs zmq)
    r = subprocess.run([str(env / "bin" / "python3"), "-c", "import numpy, sys; print(numpy.__version__); "
                        "import importlib.util as u; print(u.find_spec('safetensors') is not None)"],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1.26.4", "True"]


def test_stub_numpy_folder_is_checked(tmp_path):
    with pytest.raises(DycError, match="no numpy in it"):
        stub_env.numpy1_stub_env(tmp_path)
    with pytest.raises(DycError, match="holds numpy 2.x; the stub needs numpy < 2"):
        stub_env.numpy1_stub_env(fake_numpy(tmp_path / "np2", "2.1.0"))


def test_prepare_without_a_folder(monkeypatch):
    monkeypatch.setenv("LD_LIBRARY_PATH", "/somewhere")
    monkeypatch.setattr(stub_env, "numpy_major", lambda path=None: 1)
    assert stub_env.prepare(None) is None
    libdir, name = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and name and (Path(libdir) / name).is_file():  # a shared-library build: ours first
        assert os.environ["LD_LIBRARY_PATH"] == f"{libdir}:/somewhere"
    monkeypatch.setattr(stub_env, "numpy_major", lambda path=None: 2)
    with pytest.raises(DycError, match="give --stub-numpy DIR"):
        stub_env.prepare(None)
