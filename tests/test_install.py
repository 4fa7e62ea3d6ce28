"""vizkit as a user gets it from `pip install`: a wheel built from this checkout carries every config
under conf/, every asset under vizkit/assets/ and every module, and its installed copy runs the
default job from a directory outside the checkout."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

def files_under(folder: Path, pattern: str = "*") -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob(pattern) if p.is_file() and "__pycache__" not in p.parts}


def build_wheel(project: Path, out: Path) -> Path:
    """`pip wheel --no-deps --no-build-isolation` on a copy of `project` (building in place would
    leave build/ and *.egg-info behind in the checkout)."""
    source = out / "source"
    shutil.copytree(project, source, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("*.whl")
    return path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))


def test_the_wheel_holds_every_config_asset_and_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"vizkit/conf/{name}" for name in files_under(ROOT / "conf")}
    assets = {f"vizkit/assets/{name}" for name in files_under(ROOT / "vizkit" / "assets")}
    modules = {f"vizkit/{name}" for name in files_under(ROOT / "vizkit", "*.py")}
    assert {"vizkit/conf/config.yaml", "vizkit/conf/experiment/compare_attribution.yaml", "vizkit/assets/embedded/model.safetensors"} <= configs | assets
    assert configs - names == set(), "configs missing from the wheel"
    assert assets - names == set(), "assets missing from the wheel"
    assert modules - names == set(), "modules missing from the wheel: add their packages to [tool.setuptools] packages"
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "vizkit = vizkit.cli.app:main" in entry_points and "saliency = vizkit.methods.attribution.saliency:Saliency" in entry_points


def test_the_installed_wheel_runs_the_default_job_outside_the_checkout(wheel, tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "work"
    elsewhere.mkdir()
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target", str(target), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    where = subprocess.run([sys.executable, "-c", "import vizkit.cli.app as app; print(app.__file__); print(app.CONF_DIR)"],
                           cwd=elsewhere, capture_output=True, text=True, env=env, timeout=120)
    module, conf = where.stdout.split()
    assert Path(module).is_relative_to(target) and Path(conf) == target / "vizkit" / "conf"  # the installed copy, not the checkout
    run = subprocess.run([str(target / "bin" / "vizkit"), "trainer.progress_bar=false"], cwd=elsewhere, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    (results,) = (elsewhere / "outputs").rglob("results.json")
    summary = json.loads(results.read_text())
    assert summary["method"]["name"] == "saliency" and len(summary["inputs"]) == 6
    assert all(Path(item["source"]).is_relative_to(target) for item in summary["inputs"])  # the packaged sample images
    assert list((results.parent / "tensorboard").rglob("events.out.tfevents.*")) and (results.parent / ".hydra" / "config.yaml").is_file()


def test_the_plugin_wheel_ships_its_presets_and_declares_them(tmp_path):
    plugin = build_wheel(ROOT / "plugins" / "vizkit-rise", tmp_path)
    archive = zipfile.ZipFile(plugin)
    names = set(archive.namelist())
    assert {"vizkit_rise/conf/__init__.py", "vizkit_rise/conf/method/rise_fine.yaml"} <= names
    entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "[vizkit.configs]\nvizkit-rise = vizkit_rise.conf" in entry_points
