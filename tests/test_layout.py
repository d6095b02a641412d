"""The source layout tools can follow (issue 18, item 2): `mmrank.operator` is operator/ through a
link in mmrank/, with no import hook and no `__path__` extension, so Python, mypy and IDEs all
resolve the same files, and nothing outside mmrank/ imports as part of it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("operator", "encoders", "predictors")


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("part", PARTS)
def test_each_part_is_a_link_from_mmrank_to_its_top_level_folder(part):
    link = ROOT / "mmrank" / part
    assert link.is_symlink(), f"mmrank/{part} must be a link to ../{part}"
    assert os.readlink(link) == f"../{part}", "a relative link, so clones and images resolve it"
    assert link.resolve() == (ROOT / part).resolve()


def test_mmrank_is_one_folder_and_folders_beside_it_do_not_import_as_its_modules(tmp_path):
    probe = _python(
        "import mmrank; print(list(mmrank.__path__))\n"
        "for name in ('docs', 'charts', 'tests', 'e2e', 'bench', 'harness'):\n"
        "    try:\n"
        "        __import__('mmrank.' + name)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "    print('imported', name)\n",
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.splitlines()
    assert lines[0] == repr([str(ROOT / "mmrank")])
    assert lines[1:] == []


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_a_part_module_is_the_top_level_folders_file(where, tmp_path):
    """Started from the checkout root (`python -m` puts it first on sys.path) or from any folder."""
    cwd = ROOT if where == "root" else tmp_path
    probe = _python(
        "import sys, mmrank.operator.core as core, mmrank.predictors.artifact as artifact\n"
        "print(core.__file__); print(artifact.__file__)\n"
        "print([type(f).__name__ for f in sys.meta_path])",
        cwd=cwd,
    )
    assert probe.returncode == 0, probe.stderr
    core, artifact, finders = probe.stdout.splitlines()
    assert Path(core).resolve() == ROOT / "operator" / "core.py"
    assert Path(artifact).resolve() == ROOT / "predictors" / "artifact.py"
    assert "Editable" not in finders, f"an import hook static tools cannot follow is installed: {finders}"


def test_python_m_mmrank_runs_from_any_folder(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mmrank", "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("mmrank ")


def test_mypy_follows_mmrank_operator_to_operator_core(tmp_path):
    """A type checker resolves `mmrank.operator.core` to the real module (a revealed signature, not
    Any or a missing-import error): what go-to-definition in an IDE needs too."""
    snippet = tmp_path / "probe.py"
    snippet.write_text("import mmrank.operator.core\nreveal_type(mmrank.operator.core.desired)\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--no-incremental",
            "--follow-imports=silent",
            "--explicit-package-bases",
            "--config-file=",
            str(snippet),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MYPYPATH": str(ROOT)},
    )
    assert 'Revealed type is "def (' in result.stdout, result.stdout + result.stderr
    assert "import-not-found" not in result.stdout and "import-untyped" not in result.stdout
