"""The restricted Pod Security Standard checker (tests/restricted_profile.py) by value: a compliant
pod passes, and for each control a pod that breaks it is caught under that control's name (and,
where the standard's controls overlap, only the overlapping ones)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest

from tests.restricted_profile import CONTROLS, object_violations, violations

HARDENED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True}


def compliant() -> dict[str, Any]:
    return {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
            "sysctls": [{"name": "net.ipv4.ip_local_port_range", "value": "1024 65535"}],
        },
        "initContainers": [{"name": "fetch", "image": "x", "securityContext": dict(HARDENED)}],
        "containers": [
            {
                "name": "app",
                "image": "x",
                "ports": [{"containerPort": 8080}],
                "securityContext": {**HARDENED, "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}},
            }
        ],
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "cfg", "configMap": {"name": "c"}},
            {"name": "pvc", "persistentVolumeClaim": {"claimName": "c"}},
            {"name": "token", "projected": {"sources": []}},
        ],
    }


def rules(found: list[str]) -> set[str]:
    return {re.search(r"\[([^\]]+)\]$", m).group(1) for m in found}  # type: ignore[union-attr]


def app(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["containers"][0]["securityContext"]


def init(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["initContainers"][0]["securityContext"]


Breaker = Callable[[dict[str, Any]], object]
# (case, how the compliant pod is broken, the controls that must catch it, who the messages name)
BROKEN: list[tuple[str, Breaker, set[str], str]] = [
    ("host process", lambda p: app(p).update(windowsOptions={"hostProcess": True}), {"HostProcess"}, "container app"),
    ("host network", lambda p: p.update(hostNetwork=True), {"Host Namespaces"}, "pod"),
    ("host pid", lambda p: p.update(hostPID=True), {"Host Namespaces"}, "pod"),
    ("host ipc", lambda p: p.update(hostIPC=True), {"Host Namespaces"}, "pod"),
    ("privileged", lambda p: init(p).update(privileged=True), {"Privileged Containers"}, "init container fetch"),
    # SYS_ADMIN is beyond the default set, and beyond NET_BIND_SERVICE too: both controls say so.
    (
        "capability beyond default",
        lambda p: app(p)["capabilities"].update(add=["SYS_ADMIN"]),
        {"Capabilities (Baseline)", "Capabilities (Restricted)"},
        "container app",
    ),
    (
        "hostPath",
        lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        {"HostPath Volumes", "Volume Types"},
        "volume h",
    ),
    ("host port", lambda p: p["containers"][0]["ports"][0].update(hostPort=80), {"Host Ports"}, "container app"),
    ("apparmor field", lambda p: app(p).update(appArmorProfile={"type": "Unconfined"}), {"AppArmor"}, "container app"),
    ("apparmor annotation", lambda p: None, {"AppArmor"}, "container app"),
    ("selinux type", lambda p: p["securityContext"].update(seLinuxOptions={"type": "spc_t"}), {"SELinux"}, "pod"),
    ("selinux user", lambda p: init(p).update(seLinuxOptions={"user": "root"}), {"SELinux"}, "init container fetch"),
    ("proc mount", lambda p: app(p).update(procMount="Unmasked"), {"/proc Mount Type"}, "container app"),
    ("seccomp annotation unconfined", lambda p: None, {"Seccomp (Baseline)"}, "pod"),
    (
        "unsafe sysctl",
        lambda p: p["securityContext"]["sysctls"].append({"name": "kernel.msgmax", "value": "1"}),
        {"Sysctls"},
        "pod",
    ),
    (
        "volume type",
        lambda p: p["volumes"].append({"name": "n", "nfs": {"server": "s", "path": "/"}}),
        {"Volume Types"},
        "volume n",
    ),
    (
        "privilege escalation unset",
        lambda p: init(p).pop("allowPrivilegeEscalation"),
        {"Privilege Escalation"},
        "init container fetch",
    ),
    (
        "privilege escalation true",
        lambda p: app(p).update(allowPrivilegeEscalation=True),
        {"Privilege Escalation"},
        "container app",
    ),
    (
        "runAsNonRoot unset",
        lambda p: p["securityContext"].pop("runAsNonRoot"),
        {"Running as Non-root"},
        "init container fetch|container app",
    ),
    (
        "runAsNonRoot false in a container",
        lambda p: app(p).update(runAsNonRoot=False),
        {"Running as Non-root"},
        "container app",
    ),
    ("runAsUser 0", lambda p: init(p).update(runAsUser=0), {"Running as Non-root user"}, "init container fetch"),
    ("runAsGroup 0", lambda p: p["securityContext"].update(runAsGroup=0), {"Non-root groups"}, "pod"),
    ("fsGroup 0", lambda p: p["securityContext"].update(fsGroup=0), {"Non-root groups"}, "pod"),
    (
        "supplementalGroups 0",
        lambda p: p["securityContext"].update(supplementalGroups=[5, 0]),
        {"Non-root groups"},
        "pod",
    ),
    (
        "seccomp unset",
        lambda p: p["securityContext"].pop("seccompProfile"),
        {"Seccomp (Restricted)"},
        "init container fetch|container app",
    ),
    # Unconfined is what Baseline forbids as well.
    (
        "seccomp unconfined",
        lambda p: app(p).update(seccompProfile={"type": "Unconfined"}),
        {"Seccomp (Baseline)", "Seccomp (Restricted)"},
        "container app",
    ),
    ("drop ALL missing", lambda p: init(p).pop("capabilities"), {"Capabilities (Restricted)"}, "init container fetch"),
    (
        "default capability added",
        lambda p: app(p)["capabilities"].update(add=["CHOWN"]),
        {"Capabilities (Restricted)"},
        "container app",
    ),
]
ANNOTATIONS = {
    "apparmor annotation": {"container.apparmor.security.beta.kubernetes.io/app": "unconfined"},
    "seccomp annotation unconfined": {"seccomp.security.alpha.kubernetes.io/pod": "unconfined"},
}


def test_a_compliant_pod_passes() -> None:
    assert violations(compliant()) == []
    assert violations(compliant(), {"container.apparmor.security.beta.kubernetes.io/app": "runtime/default"}) == []


@pytest.mark.parametrize(("case", "breaker", "expected", "where"), BROKEN, ids=[b[0] for b in BROKEN])
def test_each_control_catches_the_pod_that_breaks_it(
    case: str, breaker: Breaker, expected: set[str], where: str
) -> None:
    pod = copy.deepcopy(compliant())
    breaker(pod)
    found = violations(pod, ANNOTATIONS.get(case))
    assert rules(found) == expected, found
    # `where` is who is named: one place, or (`a|b`) each of several, each at least once.
    assert {m.split(": ", 1)[0] for m in found} == set(where.split("|")), found


def test_every_control_has_a_pod_that_breaks_it() -> None:
    assert set().union(*(expected for _, _, expected, _ in BROKEN)) == set(CONTROLS)


def test_container_level_settings_satisfy_the_pod_level_controls() -> None:
    pod = compliant()
    del pod["securityContext"]
    for _, container in (("init", pod["initContainers"][0]), ("app", pod["containers"][0])):
        container["securityContext"].update(
            runAsNonRoot=True, seccompProfile={"type": "Localhost", "localhostProfile": "p.json"}
        )
    assert violations(pod) == []


def test_windows_pods_are_exempt_from_the_linux_only_controls() -> None:
    pod = {
        "os": {"name": "windows"},
        "securityContext": {"runAsNonRoot": True},
        "containers": [{"name": "w", "image": "x"}],
    }
    assert violations(pod) == []


def test_object_violations_finds_the_pod_templates_of_workloads() -> None:
    bare = {"containers": [{"name": "c", "image": "x"}]}
    deployment = {"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"template": {"spec": bare}}}
    job = {
        "kind": "CronJob",
        "metadata": {"name": "j"},
        "spec": {"jobTemplate": {"spec": {"template": {"spec": compliant()}}}},
    }
    isvc = {
        "kind": "InferenceService",
        "metadata": {"name": "i"},
        "spec": {"predictor": compliant(), "canary": [{"predictor": bare}]},
    }
    found = object_violations(deployment)
    assert found and all(m.startswith("Deployment d: container c: ") for m in found)
    assert object_violations(job) == []
    assert object_violations(isvc) and all(
        m.startswith("InferenceService i canary[0] predictor: ") for m in object_violations(isvc)
    )
    assert object_violations({"kind": "ConfigMap", "metadata": {"name": "c"}}) == []
