"""The layout rules of docs/architecture.md, checked in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("part", ["operator", "encoders", "predictors"])
def test_parts_are_not_regular_packages_at_the_root(part):
    assert (ROOT / part).is_dir()
    assert not (ROOT / part / "__init__.py").exists(), (
        f"{part}/__init__.py would make `{part}` importable as a top-level package from the checkout root"
    )


def test_python_m_from_the_checkout_root_gets_the_standard_operator():
    result = subprocess.run(
        [sys.executable, "-m", "json.tool", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    probe = _run(
        "import operator, mmrank.operator as ours; "
        "assert operator.itemgetter; print(operator.__file__); print(list(ours.__path__))"
    )
    assert probe.returncode == 0, probe.stderr
    stdlib_file, ours = probe.stdout.splitlines()
    assert "/operator/" not in stdlib_file and stdlib_file.endswith("operator.py")
    assert ours == repr([str(ROOT / "mmrank" / "operator")])  # the link to operator/ (tests/test_layout.py)


def test_the_operator_imports_no_torch_and_no_other_part():
    probe = _run(
        "import sys, importlib, pkgutil, mmrank.operator as op\n"
        "for m in pkgutil.iter_modules(op.__path__):\n"
        "    importlib.import_module('mmrank.operator.' + m.name)\n"
        "bad = [n for n in sys.modules if n == 'torch' or n.startswith('torch.')\n"
        "       or (n.startswith('mmrank.encoders') and n not in ('mmrank.encoders', 'mmrank.encoders.triton_config'))\n"
        "       or n.startswith('mmrank.predictors')]\n"
        "print(sorted(bad))"
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "module",
    [
        "mmrank.cli",
        "mmrank.api",
        "mmrank.api_crd",
        "mmrank.api_docs",
        "mmrank.pooling",
        "mmrank.store",
        "mmrank.space",
        "harness.servers",
    ],
)
def test_common_modules_import_no_torch(module):
    if not (ROOT / (module.replace(".", "/") + ".py")).exists():
        pytest.fail(f"{module} is part of the layout but missing")
    probe = _run(f"import sys, {module}; print('torch' in sys.modules)")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "False"


def test_mmrank_help_lists_every_subcommand():
    result = subprocess.run(
        [sys.executable, "-m", "mmrank", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for command in (
        "shop",
        "encoders",
        "embedder",
        "backfill",
        "ranker",
        "predictor",
        "crd",
        "validate",
        "operator",
        "render",
    ):
        assert f"    {command}" in result.stdout, f"`mmrank {command}` missing from --help:\n{result.stdout}"


def test_every_source_folder_of_a_part_is_in_the_package_list():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == {"mmrank", "mmrank.operator", "mmrank.encoders", "mmrank.predictors"}
    for part in ("mmrank", "operator", "encoders", "predictors"):
        nested = [p for p in (ROOT / part).iterdir() if p.is_dir() and not p.is_symlink() and p.name != "__pycache__"]
        assert not nested, f"{part}/ must stay flat (nested folders are not in the wheel): {nested}"


def test_the_wheel_carries_every_module_of_every_part(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    import zipfile

    wheel = next(tmp_path.glob("mmrank-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (
        ("mmrank", "mmrank"),
        ("operator", "mmrank/operator"),
        ("encoders", "mmrank/encoders"),
        ("predictors", "mmrank/predictors"),
    ):
        for source in (ROOT / folder).glob("*.py"):
            assert f"{package}/{source.name}" in names, f"{folder}/{source.name} is not in the wheel"
    shipped_harness = sorted(n for n in names if n.startswith("harness/") or "/harness/" in n)
    assert not shipped_harness, f"the test harness must stay out of the wheel: {shipped_harness}"


def test_the_import_contract_of_the_common_package_names_every_common_module():
    """import-linter (tools/static-checks.sh) checks only the modules a contract lists: a new module
    under mmrank/ must join the list, or the rule silently stops covering it."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    common = next(c for c in contracts if c["name"] == "The common mmrank modules import no part")
    assert set(common["forbidden_modules"]) == {"mmrank.operator", "mmrank.encoders", "mmrank.predictors"}
    present = {f"mmrank.{p.stem}" for p in (ROOT / "mmrank").glob("*.py") if p.stem != "__init__"}
    assert set(common["source_modules"]) == present


def test_the_harness_lives_beside_mmrank_and_a_contract_keeps_mmrank_from_importing_it():
    """harness/ (test launchers, the local node, image builds) lives beside mmrank/, never in it:
    an import-linter contract keeps mmrank and its parts from importing it."""
    import tomllib

    assert (ROOT / "harness" / "__init__.py").is_file()
    assert not (ROOT / "mmrank" / "harness").exists()
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert any(
        c["type"] == "forbidden" and c["source_modules"] == ["mmrank"] and c["forbidden_modules"] == ["harness"]
        for c in contracts
    )
