"""The MultimodalRanker models: defaults, bounds, cross-field rules (the CEL mirrors), child
names, `mmrank validate`, and the generated reference docs. Pure: no server needed."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmrank import api, api_cli, api_crd, api_docs

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def minimal() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())


def rankers_in(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == api.KIND]


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmrank")
    api_cli.register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_valid(path: Path) -> None:
    documents = rankers_in(path)
    assert documents, f"{path} holds no MultimodalRanker"
    for document in documents:
        assert api.problems(document) == []


def test_examples_cover_minimal_production_and_knative() -> None:
    by_name = {p.stem: api.MultimodalRanker.model_validate(rankers_in(p)[0]) for p in EXAMPLES}
    production, knative = by_name["production"], by_name["knative"]
    assert production.spec.encoder.gpus >= 1 and production.spec.encoder.tolerations
    assert production.spec.embeddings.store.password_secret_ref is not None
    assert production.spec.rollout.promotion == "Manual"
    assert knative.spec.rollout.kserve_mode == "Knative"
    assert set(minimal()["spec"]) == {"encoder", "ranker", "embeddings"}


def test_minimal_spec_gets_the_documented_defaults() -> None:
    spec = api.MultimodalRanker.model_validate(minimal()).spec
    assert spec.embeddings.min_coverage == 0.99
    assert spec.rollout.steps == [10, 25, 50]
    assert (spec.rollout.promotion, spec.rollout.kserve_mode, spec.rollout.interval) == ("Automatic", "Standard", "5m")
    assert (spec.encoder.backend, spec.encoder.model_name, spec.encoder.dimension) == ("python", "item_encoder", 128)
    assert spec.encoder.dynamic_batching.max_batch_size == 64
    assert spec.ranker.resources.requests == {"cpu": "1", "memory": "2Gi"}
    assert spec.embeddings.item_events.stream is None  # the ranker's own stream (its scope)


def test_models_accept_python_names_and_dump_camel_case() -> None:
    encoder = api.EncoderSpec(
        version="e1", model_uri="s3://m/e1", dynamic_batching=api.DynamicBatching(max_batch_size=8)
    )
    dumped = encoder.model_dump(by_alias=True, exclude_none=True)
    assert dumped["modelUri"] == "s3://m/e1" and dumped["dynamicBatching"]["maxBatchSize"] == 8


def test_child_names_are_the_agreed_ones() -> None:
    assert api.child_names("shop", "e1") == {
        "encoder": "shop-encoder-e1",
        "embedder": "shop-embedder",
        "backfill": "shop-backfill-e1",
        "ranker": "shop-ranker",
    }


def test_name_at_the_limit_passes_and_one_more_fails() -> None:
    manifest = minimal()
    limit = api.max_name_length("e1")
    manifest["metadata"]["name"] = "a" * limit
    assert api.problems(manifest) == []
    assert max(len(n) for n in api.child_names("a" * limit, "e1").values()) == 63
    manifest["metadata"]["name"] = "a" * (limit + 1)
    found = api.problems(manifest)
    assert len(found) == 1 and "metadata.name" in found[0] and "backfill" in found[0]


def test_child_name_problem_is_reported_beside_other_problems() -> None:
    manifest = minimal()
    manifest["metadata"]["name"] = "a" * 60
    manifest["spec"]["encoder"]["replicas"] = 0
    found = api.problems(manifest)
    assert any(p.startswith("spec.encoder.replicas:") for p in found)
    assert any("metadata.name" in p and "63" in p for p in found)


def _set(manifest: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(manifest)
    node = manifest
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return manifest


# Each CEL rule in the CRD, by its message, with a manifest that breaks it. The model validators
# must reject each with that message: on apiservers without CEL they are the only check.
CEL_MIRRORS: dict[str, tuple[str, Any]] = {
    api.RULE_STEPS: ("spec.rollout.steps", [25, 10]),
    api.RULE_TOLERATION: ("spec.encoder.tolerations", [{"key": "k", "operator": "Exists", "value": "v"}]),
    api.RULE_SECRET_NEEDS_REDIS: (
        "spec.embeddings.store",
        {"url": "file:///tmp/store", "passwordSecretRef": {"name": "s"}},
    ),
    api.RULE_RANKER_SPACE: ("spec.ranker.encoderVersion", "e9"),
    api.RULE_CHILD_NAMES: ("metadata.name", "n" * 52),
}


def _cel_messages(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [rule["message"] for rule in node.get("x-kubernetes-validations", [])]
        return own + [m for v in node.values() for m in _cel_messages(v)]
    if isinstance(node, list):
        return [m for v in node for m in _cel_messages(v)]
    return []


def test_every_cel_rule_has_a_mirror_case() -> None:
    # Transition rules (oldSelf) compare with the previous object: the operator's check mirrors
    # them (tests/test_operator_core.py, tests/test_reconcile_faults.py), not a model validator.
    messages = [m for m in _cel_messages(api_crd.crd_manifest(cel=True)) if m not in api.TRANSITION_RULES]
    assert sorted(messages) == sorted(CEL_MIRRORS), "each CEL rule needs a model mirror and a case here"
    assert _cel_messages(api_crd.crd_manifest(cel=False)) == []


@pytest.mark.parametrize("message", list(CEL_MIRRORS))
def test_model_validators_mirror_cel_rule(message: str) -> None:
    path, value = CEL_MIRRORS[message]
    found = api.problems(_set(minimal(), path, value))
    assert found, f"accepted a manifest breaking: {message}"
    assert any(message in p for p in found), found
    assert api.problems(minimal()) == []


@pytest.mark.parametrize("steps", [[10], [1, 2, 99], [], [5, 10, 25, 50]])
def test_increasing_steps_below_100_pass(steps: list[int]) -> None:
    assert api.problems(_set(minimal(), "spec.rollout.steps", steps)) == []


@pytest.mark.parametrize(
    "steps,where",
    [
        ([10, 10], "spec.rollout.steps"),
        ([50, 25], "spec.rollout.steps"),
        ([10, 100], "spec.rollout.steps[1]"),
        ([0], "spec.rollout.steps[0]"),
    ],
)
def test_bad_steps_are_named(steps: list[int], where: str) -> None:
    assert any(p.startswith(where + ":") for p in api.problems(_set(minimal(), "spec.rollout.steps", steps)))


@pytest.mark.parametrize(
    "url", ["redis://:hunter2@redis:6379/0", "redis://admin:pw@redis:6379/0", "rediss://user@redis:6380/0"]
)
def test_credentials_in_the_store_url_are_refused(url: str) -> None:
    found = api.problems(_set(minimal(), "spec.embeddings.store.url", url))
    assert any(p.startswith("spec.embeddings.store.url:") for p in found)


def test_inline_password_field_names_the_secret_ref() -> None:
    found = api.problems(_set(minimal(), "spec.embeddings.store.password", "hunter2"))
    assert len(found) == 1 and "spec.embeddings.store" in found[0] and "passwordSecretRef" in found[0]


@pytest.mark.parametrize("value", ["3", 2.5, True, None])
def test_types_are_strict_like_the_apiserver(value: Any) -> None:
    assert any(
        p.startswith("spec.encoder.replicas:") for p in api.problems(_set(minimal(), "spec.encoder.replicas", value))
    )


@pytest.mark.parametrize(
    "quantity,ok",
    [
        ("500m", True),
        ("2Gi", True),
        (1, True),
        ("1.5", True),
        ("1e3", True),
        ("lots", False),
        ("-1", False),
        (-1, False),
        ("1\n", False),
    ],
)
def test_quantities(quantity: Any, ok: bool) -> None:
    found = api.problems(_set(minimal(), "spec.ranker.resources", {"requests": {"cpu": quantity}}))
    assert (found == []) is ok, found
    if not ok:
        assert found[0].startswith("spec.ranker.resources.requests.cpu:")


def test_unknown_fields_are_named_with_their_path() -> None:
    found = api.problems(_set(minimal(), "spec.encoder.gpu", 1))
    assert found == ["spec.encoder.gpu: unknown field (the apiserver would drop it silently)"]


def test_every_problem_is_reported_not_only_the_first() -> None:
    manifest = _set(_set(minimal(), "spec.encoder.replicas", -1), "spec.rollout.interval", "soon")
    found = api.problems(_set(manifest, "spec.ranker.maxCandidates", 0))
    assert {p.split(":")[0] for p in found} == {
        "spec.encoder.replicas",
        "spec.rollout.interval",
        "spec.ranker.maxCandidates",
    }


def test_status_round_trips_and_keeps_one_condition_per_type() -> None:
    status = {
        "phase": "Progressing",
        "observedGeneration": 3,
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "CanaryInProgress",
                "message": "step 1 of 3",
                "lastTransitionTime": "2026-11-29T03:00:00Z",
                "observedGeneration": 3,
            }
        ],
        "stable": {"rankerVersion": "r1", "encoderVersion": "e1"},
        "canary": {
            "rankerVersion": "r2",
            "encoderVersion": "e2",
            "identity": "4f1c2a9e0b7d3c55",
            "state": "Progressing",
            "step": 1,
            "steps": [10, 25, 50],
            "granularityPercent": 1.0,
            "trafficPercent": 25,
            "failedChecks": 0,
            "stepStartedAt": "2026-11-29T03:00:00Z",
            "lastAnalysis": {
                "time": "2026-11-29T03:05:00Z",
                "requests": 900,
                "errorRate": 0.001,
                "latencyP99Ms": 41.0,
                "clickRateRatio": 1.02,
                "passed": True,
                "message": "ok",
            },
        },
        "embeddings": {
            "spaces": [
                {
                    "version": "e2",
                    "coverage": 0.995,
                    "items": 9950,
                    "backfill": {"completedShards": 8, "totalShards": 8, "progress": 1.0},
                }
            ],
            "coverage": 0.995,
            "freshnessP99Seconds": 1.2,
        },
        "history": [
            {
                "time": "2026-11-29T03:05:00Z",
                "reason": "StepPassed",
                "message": "step 1 of 3 (10 %) passed",
                "rankerVersion": "r2",
                "step": 1,
                "trafficPercent": 25,
            }
        ],
        "writtenByANewerOperator": "ignored",
    }
    parsed = api.RankerStatus.model_validate(status)
    assert parsed.canary is not None and parsed.canary.last_analysis is not None
    assert parsed.canary.last_analysis.click_rate_ratio == 1.02
    dumped = parsed.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped == {k: v for k, v in status.items() if k != "writtenByANewerOperator"}
    status["conditions"].append(dict(status["conditions"][0]))
    with pytest.raises(ValueError, match="one entry per type"):
        api.RankerStatus.model_validate(status)


def test_validate_cli_prints_every_problem_with_its_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_set(_set(minimal(), "spec.encoder.replicas", -1), "spec.rollout.steps", [50, 10])))
    assert run_cli(["validate", "-f", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "invalid" in out and "spec.encoder.replicas:" in out and "spec.rollout.steps:" in out


def test_validate_cli_accepts_examples_and_skips_other_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["validate", *[a for p in EXAMPLES for a in ("-f", str(p))]]) == 0
    out = capsys.readouterr().out
    assert out.count(": valid") == len(EXAMPLES) and "redis-auth" not in out


@pytest.mark.parametrize(
    "text,expected",
    [
        ("kind: [unclosed", "cannot read"),
        ("", "no manifest"),
        ("apiVersion: mmrank.io/v1\nkind: MultimodalRanker\n", "apiVersion"),
    ],
)
def test_validate_cli_unreadable_or_foreign_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    assert run_cli(["validate", "-f", str(path)]) == 1
    assert expected in capsys.readouterr().out


def test_api_docs_are_current(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["crd", "--docs"]) == 0
    assert (ROOT / "docs" / "api.md").read_text() == capsys.readouterr().out, (
        "docs/api.md is stale: run `mmrank crd --docs > docs/api.md`"
    )


def test_api_docs_list_every_spec_field_with_default() -> None:
    text = api_docs.api_reference_markdown()
    for path in (
        "spec.encoder.version",
        "spec.encoder.dynamicBatching.maxQueueDelayMicroseconds",
        "spec.embeddings.store.passwordSecretRef.name",
        "spec.rollout.analysis.minClickRateRatio",
        "status.canary.lastAnalysis.clickRateRatio",
        "status.conditions[].lastTransitionTime",
    ):
        assert f"| `{path}` |" in text
    row = next(line for line in text.splitlines() if line.startswith("| `spec.embeddings.minCoverage` |"))
    assert "`0.99`" in row


def test_spec_parses_from_the_read_only_views_kopf_hands_over() -> None:
    import kopf

    body = kopf.Body(minimal())
    assert api.RankerSpec.model_validate(body.spec) == api.MultimodalRanker.model_validate(minimal()).spec
    assert api.MultimodalRanker.model_validate(body).metadata.name == "shop"


def _leaves(node: dict[str, Any], path: str) -> list[str]:
    item = node.get("items") or {}
    children = node.get("properties") or item.get("properties")
    if not children:
        return [path]
    suffix = "[]" if item else ""
    return [leaf for name, child in children.items() for leaf in _leaves(child, f"{path}{suffix}.{name}")]


def test_the_docs_example_sets_every_field_and_is_valid() -> None:
    example = api_docs.example_manifest()
    assert api.problems({k: v for k, v in example.items() if k != "status"}) == []
    schema = api_crd.openapi_schema()["properties"]
    for path in _leaves(schema["spec"], "spec") + _leaves(schema["status"], "status"):
        value: Any = example
        for part in path.split("."):
            value = value[part.removesuffix("[]")]
            value = value[0] if part.endswith("[]") else value
        assert value is not None, path


def test_phase_type_and_phase_list_agree() -> None:
    import typing

    assert typing.get_args(api.Phase) == api.PHASES
    assert api.RankerStatus.model_validate({"phase": "AwaitingPromotion"}).phase == "AwaitingPromotion"
    with pytest.raises(ValueError):
        api.RankerStatus.model_validate({"phase": "Paused"})
