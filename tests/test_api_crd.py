"""The generated CRD against the real kube-apiserver (1.20, from the `kube` fixture): it installs,
the examples are created with the defaults the models have, status and printer columns work,
`kubectl explain` prints the model descriptions, and every bad manifest of the corpus is rejected
by the party its header names, with a message naming the field."""

from __future__ import annotations

import argparse
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import servers
from mmrank import api, api_cli, api_crd, api_docs

pytestmark = pytest.mark.apiserver

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "crds" / "mmrank.io_multimodalrankers.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CORPUS = sorted((ROOT / "tests" / "bad_manifests").glob("*.yaml"))


def names(message: str, field: str) -> bool:
    """Whether `message` names `field`; list indices are ignored (1.20 prints `steps`, not `steps[1]`)."""
    return re.sub(r"\[\d+\]", "", field) in re.sub(r"\[\d+\]", "", message)


def read_case(path: Path) -> tuple[str, str, dict[str, Any]]:
    """(who rejects it: apiserver | validate, the field its message must name, the manifest)."""
    text = path.read_text()
    header = dict(re.findall(r"^# (reject|field|why): (.+)$", text, re.M))
    assert header.get("reject") in {"apiserver", "validate"} and header.get("field"), f"{path.name}: bad header"
    return header["reject"], header["field"], yaml.safe_load(text)


@pytest.fixture
def crd(kube):  # type: ignore[no-untyped-def]
    servers.install_crds(kube.api_client, [api_crd.crd_manifest(cel=False)])
    return kube


@pytest.fixture
def namespace(crd) -> str:  # type: ignore[no-untyped-def]
    from kubernetes import client

    name = f"api-{uuid.uuid4().hex[:10]}"
    client.CoreV1Api(crd.api_client).create_namespace({"metadata": {"name": name}})
    return name


def rankers(kube):  # type: ignore[no-untyped-def]
    from kubernetes import dynamic

    return dynamic.DynamicClient(kube.api_client).resources.get(api_version=api.API_VERSION, kind=api.KIND)


def create(kube, namespace: str, body: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:  # type: ignore[no-untyped-def]
    """(the stored object, "") or (None, the apiserver's error message)."""
    from kubernetes.client.exceptions import ApiException

    try:
        return rankers(kube).create(body=body, namespace=namespace).to_dict(), ""
    except ApiException as exc:
        assert exc.status == 422, exc.body
        return None, json.loads(exc.body)["message"]


def test_committed_crd_is_the_generated_one(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="mmrank")
    api_cli.register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["crd"])
    assert args.handler(args) == 0
    assert CRD_FILE.read_text() == capsys.readouterr().out, (
        "crds/mmrank.io_multimodalrankers.yaml is stale: run `mmrank crd > crds/mmrank.io_multimodalrankers.yaml`"
    )


CHART_CRDS = ROOT / "charts" / "mmrank-operator" / "files" / "crds"


@pytest.mark.parametrize(
    ("copy", "flags"),
    [("mmrank.io_multimodalrankers.yaml", []), ("mmrank.io_multimodalrankers.no-cel.yaml", ["--no-cel"])],
)
def test_the_charts_crd_copies_are_the_generated_ones(
    capsys: pytest.CaptureFixture[str], copy: str, flags: list[str]
) -> None:
    """The chart renders its CRD template from these two (CEL from Kubernetes 1.25, without below)."""
    parser = argparse.ArgumentParser(prog="mmrank")
    api_cli.register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["crd", *flags])
    assert args.handler(args) == 0
    assert (CHART_CRDS / copy).read_text() == capsys.readouterr().out, (
        f"charts/mmrank-operator/files/crds/{copy} is stale: run "
        f"`mmrank crd {' '.join(flags)} > charts/mmrank-operator/files/crds/{copy}`"
    )
    assert not (CHART_CRDS.parent.parent / "crds").exists(), (
        "charts/mmrank-operator/crds/ is back: Helm would install that copy too, beside the CRD template "
        "(the chart's CRD copies live in files/crds/)"
    )


def _nodes(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, child in (node.get("properties") or {}).items():
        found += _nodes(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            found += _nodes(node[key], f"{path}[]")
    return found


def test_schema_is_structural_and_described() -> None:
    crd = yaml.safe_load(CRD_FILE.read_text())
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _nodes(schema):
        assert "$ref" not in node and "allOf" not in node and "oneOf" not in node, path
        assert "anyOf" not in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node and node["pattern"] == api.QUANTITY, path
        else:
            assert "type" in node, path
        if path.startswith((".spec", ".status")) and not path.endswith("[]"):
            assert node.get("description"), f"{path} has no description"
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Stable",
        "Canary",
        "Traffic",
        "Step",
        "Coverage",
        "Age",
    ]
    assert crd["spec"]["names"]["shortNames"] == ["mmr"] and crd["spec"]["scope"] == "Namespaced"


def test_crd_installs_and_is_established(crd) -> None:  # type: ignore[no-untyped-def]
    from kubernetes import client

    stored = client.ApiextensionsV1Api(crd.api_client).read_custom_resource_definition(api.CRD_NAME)
    conditions = {c.type: c.status for c in stored.status.conditions}
    assert conditions.get("Established") == "True" and conditions.get("NonStructuralSchema") is None
    assert stored.status.accepted_names.short_names == ["mmr"]


def test_no_cel_crd_applies_with_kubectl(crd) -> None:  # type: ignore[no-untyped-def]
    result = crd.kubectl("apply", "-f", "-", input=api_crd.crd_yaml(cel=False), check=False)
    assert result.returncode == 0, result.stderr
    result = crd.kubectl("apply", "--dry-run=server", "-f", str(CRD_FILE), check=False)
    assert result.returncode != 0 and "x-kubernetes-validations" in result.stderr  # 1.20 knows no CEL


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_created_with_the_model_defaults(crd, namespace: str, path: Path) -> None:  # type: ignore[no-untyped-def]
    result = crd.kubectl("apply", "-n", namespace, "-f", str(path), check=False)
    assert result.returncode == 0, result.stderr
    for document in (d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == api.KIND):
        stored = rankers(crd).get(name=document["metadata"]["name"], namespace=namespace).to_dict()
        # The apiserver's defaulting must give exactly the spec the models give.
        assert stored["spec"] == api.MultimodalRanker.model_validate(document).to_manifest()["spec"]


def test_status_subresource_and_printer_columns(crd, namespace: str) -> None:  # type: ignore[no-untyped-def]
    manifest = yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())
    example = api_docs.example_manifest()
    manifest["status"] = example["status"]
    stored, message = create(crd, namespace, manifest)
    assert stored is not None, message
    assert "status" not in stored or not stored["status"], "create must ignore status (status subresource)"
    rankers(crd).status.patch(
        body={"status": example["status"]},
        name="shop",
        namespace=namespace,
        content_type="application/merge-patch+json",
    )
    stored = rankers(crd).get(name="shop", namespace=namespace).to_dict()
    assert api.RankerStatus.model_validate(stored["status"]) == api.RankerStatus.model_validate(example["status"])
    table = crd.kubectl("get", "mmr", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "STABLE", "CANARY", "TRAFFIC", "COVERAGE", "AGE"]
    status = example["status"]
    assert table[1].split()[:6] == [
        "shop",
        status["phase"],
        status["stable"]["rankerVersion"],
        status["canary"]["rankerVersion"],
        str(status["canary"]["trafficPercent"]),
        str(status["embeddings"]["coverage"]),
    ]


def test_kubectl_explain_prints_model_descriptions(crd) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 30
    while True:  # the apiserver publishes a new CRD's OpenAPI a moment after it is Established
        result = crd.kubectl("explain", "multimodalranker.spec.encoder", check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert api.RankerSpec.model_fields["encoder"].description in text
    for name, field in api.EncoderSpec.model_fields.items():
        assert (field.alias or name) in text
        assert " ".join((field.description or "").split())[:40] in text, f"{name}: description missing"


def test_corpus_is_large_and_covers_both_parties() -> None:
    cases = [read_case(p) for p in CORPUS]
    assert len(cases) >= 40
    assert {who for who, _, _ in cases} == {"apiserver", "validate"}


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_bad_manifest_is_rejected_naming_the_field(crd, namespace: str, path: Path) -> None:  # type: ignore[no-untyped-def]
    who, field, manifest = read_case(path)
    problems = api.problems(manifest)
    assert any(names(p, field) for p in problems), f"mmrank validate did not name {field}: {problems}"
    stored, message = create(crd, namespace, manifest)
    if who == "apiserver":
        assert stored is None, "the apiserver accepted it"
        assert names(message, field), message
    else:
        # 1.20 prunes unknown fields and evaluates no CEL: only `mmrank validate` catches these.
        assert stored is not None, f"the apiserver rejected it ({message}): mark it `reject: apiserver`"
