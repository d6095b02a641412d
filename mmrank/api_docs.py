"""docs/api.md, the MultimodalRanker API reference, generated from the models in `mmrank.api`
and the CRD schema `mmrank.api_crd` makes of them (`mmrank crd --docs`; a test fails when the
file is stale).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from mmrank import api, api_crd


def _type_name(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "quantity (int or string)"
    if "enum" in node:
        return " \\| ".join(str(v) for v in node["enum"])
    kind = node.get("type", "object")
    if kind == "array":
        return f"array of {_type_name(node.get('items', {}))}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map of {_type_name(node['additionalProperties'])}"
    return str(kind)


def _bounds(node: dict[str, Any]) -> str:
    parts: list[str] = []
    if node.get("exclusiveMinimum") is True:
        parts.append(f"> {node['minimum']}")
    for key, label in (
        ("minimum", ">="),
        ("maximum", "<="),
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("maxItems", "max items"),
        ("pattern", "pattern"),
    ):
        if key in node and not (key == "minimum" and node.get("exclusiveMinimum") is True):
            value = f"`{node[key]}`" if key == "pattern" else node[key]
            parts.append(f"{label} {value}")
    items = node.get("items", {})
    for key, label in (("minimum", "each >="), ("maximum", "each <=")):
        if key in items:
            parts.append(f"{label} {items[key]}")
    for rule in node.get("x-kubernetes-validations", []):
        parts.append(f"rule: {rule['message']}")
    return "; ".join(parts).replace("|", "\\|")


def _walk(node: dict[str, Any], path: str, required: bool) -> Iterator[tuple[str, dict[str, Any], bool]]:
    yield path, node, required
    children = node.get("properties") or (node.get("items") or {}).get("properties")
    if children:
        needed = set(node.get("required") or (node.get("items") or {}).get("required") or [])
        suffix = "[]" if node.get("type") == "array" else ""
        for name, child in children.items():
            yield from _walk(child, f"{path}{suffix}.{name}", name in needed)


def _lookup(document: Any, path: str) -> Any:
    """The value at a docs path (`a.b[].c`: first list element) of an example document."""
    for part in path.split("."):
        if not isinstance(document, dict):
            return None
        document = document.get(part.removesuffix("[]"))
        if part.endswith("[]"):
            document = document[0] if document else None
    return document


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def _cell(value: Any) -> str:
    import json

    if value is None:
        return ""
    return f"`{json.dumps(value, separators=(', ', ': '))}`".replace("|", "\\|")


def api_reference_markdown() -> str:
    """docs/api.md: every field with its type, default, bounds and an example, from the models."""
    lines = [
        "# MultimodalRanker API reference",
        "",
        "Generated from `mmrank/api.py` by `mmrank crd --docs` (a test fails when this file is stale).",
        f"Group `{api.GROUP}`, version `{api.VERSION}`, kind `{api.KIND}`, plural `{api.PLURAL}`, short name "
        f"`{api.SHORT_NAMES[0]}`, namespaced, status subresource.",
        "",
        "Cross-field rules are CEL `x-kubernetes-validations` in the CRD and model validators in "
        "`mmrank.api`, so `mmrank validate` and the operator enforce them on clusters without CEL:",
        "",
    ]
    schema = api_crd.openapi_schema(cel=True)
    for path, node, _ in _walk(schema, "", False):
        for where, holder in ((path or ".", node), (f"{path}[]", node.get("items") or {})):
            for rule in holder.get("x-kubernetes-validations", []):
                lines.append(f"- `{where}`: {rule['message']} (`{rule['rule']}`)")
    lines += [
        "",
        "Install: `kubectl apply -f crds/mmrank.io_multimodalrankers.yaml` (Kubernetes 1.25 or later, "
        "which evaluate CEL), or `mmrank crd --no-cel | kubectl apply -f -` on older clusters, which "
        "refuse `x-kubernetes-validations`. An apiserver prunes unknown fields (silently, unless the client "
        "asks for strict field validation, which 1.20 cannot); "
        "`mmrank validate -f FILE` checks a manifest with the models (strict types, unknown fields, "
        "every rule above) and prints each problem with its field path, exit status 1 when invalid.",
    ]
    lines += [
        "",
        "Child objects of a resource named `x` with encoder version `E` (each name at most 63 "
        "characters): " + ", ".join(f"`{n}`" for n in api.child_names("x", "E").values()) + ".",
        "",
    ]
    example = example_manifest()
    for section in ("spec", "status"):
        lines += [
            f"## {section}",
            "",
            "| field | type | required | default | bounds | example | description |",
            "|---|---|---|---|---|---|---|",
        ]
        for path, node, required in _walk(schema["properties"][section], section, True):
            if path == section:
                continue
            has_fields = "properties" in node or "properties" in (node.get("items") or {})
            example_value = None if has_fields else _lookup(example, path)
            lines.append(
                f"| `{path}` | {_type_name(node)} | {'yes' if required else ''} | {_cell(node.get('default'))} "
                f"| {_bounds(node)} | {_cell(example_value)} | {node.get('description', '')} |"
            )
        lines.append("")
    import yaml

    lines += [
        "## A complete example",
        "",
        "Every field set to its example (or default) value, as the operator would see it with a status written:",
        "",
        "```yaml",
        yaml.safe_dump(example, sort_keys=False, width=100).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _example_of(model: type[BaseModel]) -> dict[str, Any]:
    """A model's fields filled with their declared examples, defaults, or nested examples."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        key = info.alias or name
        nested = next(iter(_models_in(info.annotation)), None)
        if info.examples:
            value = info.examples[0]
        elif nested is not None:
            value = _example_of(nested)
        elif not info.is_required() and info.default_factory is None:
            value = info.default
        else:
            value = info.get_default(call_default_factory=True)
        if value is None:
            continue
        is_list = "list[" in str(info.annotation)
        out[key] = [value] if is_list and nested is not None and isinstance(value, dict) else value
    return out


def example_manifest() -> dict[str, Any]:
    """A MultimodalRanker with every field at its example value (docs/api.md shows it)."""
    spec = _example_of(api.RankerSpec)
    return api.MultimodalRanker.model_validate(
        {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": "shop", "namespace": "ads"},
            "spec": spec,
            "status": _example_of(api.RankerStatus),
        }
    ).to_manifest()
