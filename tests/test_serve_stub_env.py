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


@pytest.mark.skipif(subprocess.run(["which", "ldd"], capture_output=True).returncode != 0, reason="needs ldd")
def test_server_libraries_found_when_pytriton_is_not_in_site_packages(tmp_path):
    """PyTriton installed with ``pip install --target DIR`` (+ PYTHONPATH) takes itself for an editable
    install and points tritonserver at a folder that does not exist; a copy of the server binary (PyTriton
    runs one from its workspace) then misses libcudart (seen on the H200). find_server_libs fixes the path."""
    pytriton = pytest.importorskip("pytriton")
    pkg = Path(pytriton.__file__).parent
    libs = pkg.parent / "nvidia_pytriton.libs"
    if not libs.is_dir():
        pytest.skip("this PyTriton has no nvidia_pytriton.libs beside it (not a wheel install)")
    target = tmp_path / "target"  # what pip install --target leaves: the package and its libs side by side
    target.mkdir()
    (target / "pytriton").symlink_to(pkg)
    (target / "nvidia_pytriton.libs").symlink_to(libs)
    server = tmp_path / "workspace" / "tritonserver"  # PyTriton copies the server out of the package
    server.mkdir(parents=True)
    (server / "tritonserver").write_bytes((pkg / "tritonserver" / "bin" / "tritonserver").read_bytes())
    (server / "tritonserver").chmod(0o755)
    code = ("import os, sys; from pytriton.utils import distribution as d; from dyc.serve import stub_env; "
            "print(d.get_libs_path().is_dir()); stub_env.find_server_libs(); print(os.environ['LD_LIBRARY_PATH'])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(Path(__file__).parents[1])]),
           "LD_LIBRARY_PATH": ""}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    not_found_by_pytriton, ld_path = r.stdout.split()
    assert not_found_by_pytriton == "False"  # PyTriton's own lookup fails in this layout
    assert ld_path.split(":")[0] == str(target / "nvidia_pytriton.libs")

    def missing(ld: str) -> list[str]:
        out = subprocess.run(["ldd", str(server / "tritonserver")], capture_output=True, text=True,
                             env={**os.environ, "LD_LIBRARY_PATH": ld}).stdout
        return [line.split()[0] for line in out.splitlines() if "not found" in line]

    assert any("cudart" in m for m in missing("")), "the copied server should miss libcudart without the path"
    assert missing(ld_path) == []


def test_server_libraries_missing_is_a_clear_error(tmp_path, monkeypatch):
    distribution = pytest.importorskip("pytriton.utils.distribution")
    monkeypatch.setattr(distribution, "get_libs_path", lambda: tmp_path / "external_libs")
    monkeypatch.setattr(distribution, "get_root_module_path", lambda: tmp_path / "pytriton")
    with pytest.raises(DycError, match="reinstall nvidia-pytriton"):
        stub_env.find_server_libs()
