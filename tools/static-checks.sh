#!/usr/bin/env bash
# The static checks `./dev.sh test` runs before the tests (seconds): ruff (lint, and the layout
# `ruff format` gives: run `ruff format .` to apply it), mypy (strict on
# the modules listed under [tool.mypy] in pyproject.toml) and import-linter (the import rules of
# docs/architecture.md, [tool.importlinter] in pyproject.toml).
# Run alone: tools/static-checks.sh (after ./dev.sh setup).
#
# mypy reads the checkout itself: mmrank/operator, mmrank/encoders and mmrank/predictors are links
# to the top-level folders. import-linter's graph builder (grimp) does not walk into a folder
# without __init__.py inside a package, and the parts have none (a regular package named
# `operator` at the checkout root would shadow the standard library's), so it reads a copy where
# they do: build/static-checks/{mmrank,harness}.
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
  : > "$tree/mmrank/$part/__init__.py"
done
[ -d harness ] && cp -r harness "$tree/harness"

status=0
echo "ruff check" >&2
"$bin/ruff" check --quiet . || status=1
echo "ruff format --check" >&2
"$bin/ruff" format --check --quiet . || { echo "run: $bin/ruff format ." >&2; status=1; }
echo "mypy" >&2
# Messages name mmrank/operator/x.py (the link); print the real file, operator/x.py.
"$py" -m mypy 2>&1 | sed -E 's#^mmrank/(operator|encoders|predictors)/#\1/#' || status=1
echo "import-linter" >&2
(cd "$tree" && PYTHONPATH=$PWD "$bin/lint-imports" --no-logo --no-cache ../../pyproject.toml 2>&1) || status=1
exit $status
