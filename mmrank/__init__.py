"""mmrank: a multimodal CTR ranker (SCL item encoder, SimTier, MAKE) in production on Kubernetes.

The parts are subpackages: `mmrank.encoders` (phase 1 and the embedder), `mmrank.predictors`
(phase 2 and serving) and `mmrank.operator` (the Kubernetes operator). Modules directly under
`mmrank` are the small common package the parts share: the API models, the store, the shop data.
"""
from pathlib import Path as _Path

__version__ = "0.1.0"


def _checkout_parts() -> list[str]:
    """In a source checkout the parts are the top-level folders `operator/`, `encoders/` and
    `predictors/`, deliberately without `__init__.py`: a regular package named `operator` at the
    checkout root would shadow the standard library's `operator` for `python -m` run there.
    Adding the checkout to this package's path makes them `mmrank.operator` and so on. An
    installed wheel already has them inside `mmrank/`, and nothing is added."""
    checkout = _Path(__file__).resolve().parent.parent
    pyproject = checkout / "pyproject.toml"
    if (checkout / "operator").is_dir() and pyproject.is_file() and 'name = "mmrank"' in pyproject.read_text():
        return [str(checkout)]
    return []


__path__ += _checkout_parts()
