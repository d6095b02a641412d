"""Property tests: any spec the models accept passes the CRD's OpenAPI schema and comes back from
the real apiserver unchanged (nothing pruned, nothing rewritten), and a sparse spec comes back
with exactly the defaults the models give.

Specs are drawn from the generated schema itself (types, bounds, patterns, enums), repaired for
the cross-field rules, and kept only when the models accept them."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from harness import servers
from mmrank import api, api_crd

SPEC_SCHEMA = api_crd.openapi_schema(cel=False)["properties"]["spec"]
TEXT = st.characters(blacklist_categories=("Cs", "Cc"))
KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789./-_", min_size=1, max_size=24)


def _string(node: dict[str, Any]) -> st.SearchStrategy[str]:
    low, high = node.get("minLength", 0), node.get("maxLength", 64)
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "pattern" in node:
        return st.from_regex(node["pattern"], fullmatch=True, alphabet=TEXT).filter(lambda s: low <= len(s) <= high)
    return st.text(TEXT, min_size=low, max_size=min(high, 64))


def _number(node: dict[str, Any], integer: bool) -> st.SearchStrategy[Any]:
    low, high = node.get("minimum"), node.get("maximum")
    if integer:
        return st.integers(
            min_value=low if low is not None else -(10**9), max_value=high if high is not None else 10**9
        )
    return st.floats(
        min_value=low,
        max_value=high,
        exclude_min=node.get("exclusiveMinimum") is True,
        allow_nan=False,
        allow_infinity=False,
        width=64,
    )


def from_schema(node: dict[str, Any], path: str = "spec") -> st.SearchStrategy[Any]:
    if node.get("x-kubernetes-int-or-string"):
        return st.one_of(st.integers(0, 10**6), st.from_regex(node["pattern"], fullmatch=True))
    kind = node.get("type")
    if kind == "string":
        return _string(node)
    if kind in {"integer", "number"}:
        return _number(node, kind == "integer")
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        items = from_schema(node["items"], path + "[]")
        size = node.get("maxItems", 3)
        if path == "spec.rollout.steps":  # strictly increasing by construction
            return st.lists(items, unique=True, max_size=size).map(sorted)
        return st.lists(items, max_size=min(size, 3))
    if "properties" in node:
        required = set(node.get("required", []))
        props = {k: from_schema(v, f"{path}.{k}") for k, v in node["properties"].items()}
        return st.fixed_dictionaries(
            {k: v for k, v in props.items() if k in required},
            optional={k: v for k, v in props.items() if k not in required},
        )
    if isinstance(node.get("additionalProperties"), dict):
        return st.dictionaries(KEYS, from_schema(node["additionalProperties"], path + "[]"), max_size=3)
    raise AssertionError(f"no strategy for {path}: {node}")


def repaired(spec: dict[str, Any]) -> dict[str, Any]:
    """Apply the cross-field rules a per-field strategy cannot know."""
    spec = copy.deepcopy(spec)
    spec["ranker"]["encoderVersion"] = spec["encoder"]["version"]
    for toleration in spec["encoder"].get("tolerations", []):
        if toleration.get("operator") == "Exists":
            toleration.pop("value", None)
    store = spec["embeddings"]["store"]
    if not store["url"].startswith("redis"):
        store.pop("passwordSecretRef", None)
    return spec


SPECS = from_schema(SPEC_SCHEMA).map(repaired)


def manifest(spec: dict[str, Any], name: str = "prop") -> api.MultimodalRanker | None:
    try:
        return api.MultimodalRanker.model_validate(
            {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": spec}
        )
    except ValueError:
        return None


@settings(max_examples=60, deadline=None, database=None)
@given(SPECS)
def test_model_valid_specs_pass_the_crd_schema(spec: dict[str, Any]) -> None:
    model = manifest(spec)
    assume(model is not None)
    assert model is not None
    dumped = model.to_manifest()["spec"]
    jsonschema.Draft4Validator(SPEC_SCHEMA).validate(dumped)
    assert api.RankerSpec.model_validate(dumped) == model.spec


@pytest.fixture
def prop_namespace(kube) -> tuple[Any, str]:  # type: ignore[no-untyped-def]
    from kubernetes import client, dynamic

    servers.install_crds(kube.api_client, [api_crd.crd_manifest(cel=False)])
    name = f"prop-{uuid.uuid4().hex[:10]}"
    client.CoreV1Api(kube.api_client).create_namespace({"metadata": {"name": name}})
    resource = dynamic.DynamicClient(kube.api_client).resources.get(api_version=api.API_VERSION, kind=api.KIND)
    return resource, name


@pytest.mark.apiserver
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    phases=[Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(spec=SPECS, sparse=st.booleans())
def test_model_valid_specs_round_trip_through_the_apiserver(
    prop_namespace: tuple[Any, str], spec: dict[str, Any], sparse: bool
) -> None:
    resource, namespace = prop_namespace
    name = f"p{uuid.uuid4().hex[:12]}"
    model = manifest(spec, name)
    assume(model is not None)
    assert model is not None
    full = model.to_manifest()
    sent = model.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True) if sparse else full
    sent = {**sent, "apiVersion": api.API_VERSION, "kind": api.KIND}
    stored = resource.create(body=sent, namespace=namespace).to_dict()
    # Unchanged: every field kept (no pruning), every value as sent, and the defaults the
    # apiserver fills in are the models' defaults.
    assert stored["spec"] == full["spec"]
    assert api.RankerSpec.model_validate(stored["spec"]) == model.spec
