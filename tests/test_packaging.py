"""`pip install .` (not only `-e .`) must give a working `xtalgen` with every subpackage."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import REPO_ROOT


def _mapped_packages() -> dict[str, Path]:
    """Every folder with an __init__.py below the package-dir mapping, as its dotted name."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {}
    for name, folder in config["package-dir"].items():
        root = REPO_ROOT / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            dotted = ".".join([name, *rel.parts]) if rel.parts else name
            if "__pycache__" not in dotted:
                found[dotted] = init.parent
    return found


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    missing = sorted(set(_mapped_packages()) - set(config["packages"]))
    assert not missing, f"add these to [tool.setuptools] packages: {missing}"


def test_non_editable_install_imports_every_package(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         str(REPO_ROOT), "--target", str(target)],
        check=True, capture_output=True,
    )
    assert not (target / "models").exists() and not (target / "datasets").exists()
    names = sorted(_mapped_packages())
    code = "import importlib, sys; print([importlib.import_module(n).__file__ for n in sys.argv[1:]])"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code, *names], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(str(target)) == len(names), out.stdout  # not the editable checkout
    presets = {p.name for p in (target / "xtalgen" / "configs").glob("*.yaml")}
    assert {"debug.yaml", "base.yaml", "large.yaml", "xl.yaml"} <= presets
    recipes = {p.name for p in (target / "xtalgen" / "configs" / "finetune").glob("*.yaml")}
    shipped = {p.name for p in (Path(__file__).parents[1] / "configs" / "finetune").glob("*.yaml")}
    assert recipes == shipped and "dft_band_gap.yaml" in recipes  # `xtalgen finetune BASE dft_band_gap` works
