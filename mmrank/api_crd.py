"""The MultimodalRanker CustomResourceDefinition, generated from the models in `mmrank.api`.

`crd_manifest()` turns the models' JSON schema into a structural OpenAPI v3 schema (what
`kubectl explain` prints and the apiserver enforces), with the CEL `x-kubernetes-validations`
rules the models declare, or without them (`cel=False`) for apiservers that know no CEL
(Kubernetes < 1.25), where the model validators are the only check of those rules.

Torch-free and kubernetes-free, like `mmrank.api`: `mmrank crd` and the tests import it.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from mmrank import api

_DROP = {"title", "additionalProperties", "examples"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """pydantic JSON schema -> structural OpenAPI v3 (inline refs, nullable instead of anyOf null)."""
    if isinstance(node, list):
        return [_structural(v, defs) for v in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        node = {**target, **node}
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b != {"type": "null"}]
        nullable = len(branches) < len(node["anyOf"])
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(branches) == 1:
            node = {**_structural(branches[0], defs), **rest}
        elif node.get("x-kubernetes-int-or-string"):
            node = rest  # no anyOf: kubectl's OpenAPI v2 reader rejects it under additionalProperties
        else:
            raise ValueError(f"cannot express anyOf in a structural schema: {node}")
        if nullable:
            node["nullable"] = True
            if node.get("default", 0) is None:
                del node["default"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
        node.setdefault("type", "string")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP and not (key == "additionalProperties" and isinstance(value, dict)):
            continue
        if key == "properties":
            out[key] = {name: _structural(v, defs) for name, v in value.items()}
        elif key in {"items", "additionalProperties"}:
            out[key] = _structural(value, defs)
        elif key == "$defs":
            continue
        else:
            out[key] = value
    if out.get("default") == "":
        del out["default"]  # Kubernetes 1.20 reads `default: ""` as null and refuses the CRD
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(out.get(exclusive), (int, float)) and not isinstance(out[exclusive], bool):
            out[bound], out[exclusive] = out[exclusive], True  # JSON Schema 2020 -> OpenAPI 3.0
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _model_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    structural: dict[str, Any] = _structural(schema, schema.get("$defs", {}))
    return structural


def _strip(node: Any, key: str) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v, key) for k, v in node.items() if k != key}
    if isinstance(node, list):
        return [_strip(v, key) for v in node]
    return node


def openapi_schema(cel: bool = True) -> dict[str, Any]:
    """The CRD's openAPIV3Schema for the whole object."""
    root_extra = api.MultimodalRanker.model_config.get("json_schema_extra") or {}
    schema: dict[str, Any] = {
        "type": "object",
        "description": api.MultimodalRanker.__doc__,
        "properties": {
            "apiVersion": {"type": "string", "description": "mmrank.io/v1alpha1"},
            "kind": {"type": "string", "description": "MultimodalRanker"},
            "metadata": {"type": "object"},
            "spec": _model_schema(api.RankerSpec),
            "status": _model_schema(api.RankerStatus),
        },
        "required": ["spec"],
        **copy.deepcopy(root_extra),  # type: ignore[arg-type]  # json_schema_extra: a dict here (_cel), typed as a union
    }
    return schema if cel else _strip(schema, "x-kubernetes-validations")


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
    {
        "name": "Stable",
        "type": "string",
        "jsonPath": ".status.stable.rankerVersion",
        "description": "Ranker version serving stable traffic.",
    },
    {
        "name": "Canary",
        "type": "string",
        "jsonPath": ".status.canary.rankerVersion",
        "description": "Ranker version in canary.",
    },
    {
        "name": "Traffic",
        "type": "integer",
        "jsonPath": ".status.canary.trafficPercent",
        "description": "Percent of requests on the canary (a multiple of the backend's granularity).",
    },
    {
        "name": "Step",
        "type": "integer",
        "jsonPath": ".status.canary.step",
        "priority": 1,
        "description": "Index of the canary's current step.",
    },
    {
        "name": "Coverage",
        "type": "number",
        "jsonPath": ".status.embeddings.coverage",
        "description": "Catalogue coverage of the target embedding space.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd_manifest(cel: bool = True) -> dict[str, Any]:
    """The CustomResourceDefinition. `cel=False` drops the CEL rules for apiservers that know no
    CEL (Kubernetes < 1.25): there the model validators are the only check of those rules."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": api.CRD_NAME},
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["mmrank"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema(cel)},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                }
            ],
        },
    }


def crd_yaml(cel: bool = True) -> str:
    import yaml

    class NoAliases(yaml.SafeDumper):  # type: ignore[misc]  # PyYAML ships no annotations: an Any base
        """Every repeated list written out in full: `&id001` anchors are legal YAML, but a reader
        of the CRD (or a tool that does not resolve them) should see each schema as it is."""

        def ignore_aliases(self, data: Any) -> bool:
            return True

    header = "# Generated by `mmrank crd` from mmrank/api.py. Do not edit: change the models.\n"
    text: str = yaml.dump(crd_manifest(cel), Dumper=NoAliases, sort_keys=False, width=100, allow_unicode=True)
    return header + text
