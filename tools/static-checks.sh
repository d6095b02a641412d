#!/usr/bin/env bash
# The static checks `./dev.sh test` runs before the tests (seconds): ruff (lint only, no format
# check), mypy (strict on the modules listed under [tool.mypy] in pyproject.toml) and
# import-linter (the import rules of docs/architecture.md, [tool.importlinter] in pyproject.toml).
# Run alone: tools/static-checks.sh (after ./dev.sh setup).
#
# mypy and import-linter cannot follow `mmrank.operator` to operator/ (mmrank/__init__.py adds the
# checkout to `mmrank.__path__` at run time), so they read a copy laid out as the wheel is:
# build/static-checks/mmrank/{*.py,operator/,encoders/,predictors/}. Messages name the real files.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(cat .venv/.deps)/bin   # the locked dependency venv (dev.sh ensure_venv)
py=$PWD/.venv/bin/python       # sees those and this checkout
tree=build/static-checks
rm -rf "$tree"
mkdir -p "$tree/mmrank"
cp mmrank/*.py "$tree/mmrank/"
for part in operator encoders predictors; do
  mkdir "$tree/mmrank/$part"
  cp "$part"/*.py "$tree/mmrank/$part/"
  : > "$tree/mmrank/$part/__init__.py"   # regular packages here, so both tools walk into them
done
# build/static-checks/mmrank/operator/x.py -> operator/x.py, build/static-checks/mmrank/x.py -> mmrank/x.py
real_paths() { sed -E "s#$tree/mmrank/(operator|encoders|predictors)/#\\1/#g; s#$tree/mmrank/#mmrank/#g"; }

status=0
echo "ruff check" >&2
"$bin/ruff" check --quiet . || status=1
echo "mypy" >&2
(cd "$tree" && "$py" -m mypy --config-file ../../pyproject.toml 2>&1) | real_paths || status=1
echo "import-linter" >&2
(cd "$tree" && PYTHONPATH=$PWD "$bin/lint-imports" --no-logo --no-cache ../../pyproject.toml 2>&1) | real_paths \
  || status=1
exit $status
