"""Release shape: ``python -m build`` makes an sdist and a wheel; the wheel, installed in a
fresh virtual environment, passes tests taken from the sdist (not from this checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import patternnet

pytest.importorskip("build")

ROOT = Path(__file__).resolve().parents[1]
#: Run from the unpacked sdist against the installed wheel: the core, files, CLI and interop.
FROM_THE_WHEEL = [
    "tests/test_version.py",
    "tests/test_registry.py",
    "tests/test_pattern_methods.py",
    "tests/test_patterns_files.py",
    "tests/test_captum_interop.py",
]


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (
        f"{' '.join(map(str, command))} failed ({done.returncode}):\n"
        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


@pytest.mark.slow
def test_wheel_and_sdist_install_and_pass_tests_in_a_fresh_venv(tmp_path) -> None:
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not a source checkout")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    dist = tmp_path / "dist"
    # sdist first, then the wheel built from the unpacked sdist (python -m build's default);
    # --no-isolation: the build backend (setuptools) of this environment, no download
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
         tmp_path, env, 300)
    version = patternnet.__version__
    wheel = dist / f"patternnet-{version}-py3-none-any.whl"
    sdist = dist / f"patternnet-{version}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in dist.iterdir())
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta = archive.read(f"patternnet-{version}.dist-info/METADATA").decode()
    assert "patternnet/quantus.py" in names and "patternnet/cli/__init__.py" in names
    assert not any(name.startswith("tests/") for name in names)
    for requirement in ("torch", "numpy", "safetensors", "tqdm"):
        assert f"Requires-Dist: {requirement}" in meta
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "sdist", filter="data")
    unpacked = tmp_path / "sdist" / f"patternnet-{version}"
    assert (unpacked / "CHANGELOG.md").is_file() and (unpacked / "tests/conftest.py").is_file()

    # A fresh venv with patternnet from the wheel only. Its dependencies (torch, numpy, ...)
    # come from this environment's site-packages through a .pth line (no .pth files of this
    # environment are run, so an editable install of patternnet here stays invisible).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env, 120)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                      "['purelib'])"], tmp_path, env, 60).strip())
    (site / "_parent_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
         tmp_path, env, 120)
    where = _run([str(python), "-c", "import patternnet; print(patternnet.__file__)"],
                 unpacked, env, 60).strip()
    assert Path(where).is_relative_to(site), where
    assert _run([str(venv / "bin" / "patternnet"), "--version"], unpacked, env, 60).strip() == (
        f"patternnet {version}"
    )
    _run([str(python), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *FROM_THE_WHEEL],
         unpacked, env, 600)
