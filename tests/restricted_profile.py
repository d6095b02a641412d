"""The restricted Pod Security Standard as a pure check: `violations(pod_spec) -> [messages]`.

Written from the published standard (kubernetes.io/docs/concepts/security/pod-security-standards,
"Baseline" and "Restricted"), because Kubernetes 1.20, the apiserver these tests build, has no Pod
Security admission to ask. Each rule below is one control of that page, with the fields it
restricts and the values it allows; "Non-root groups" is the optional control of the standard's
first edition (Kubernetes 1.19-1.21 documentation), kept because it costs nothing to meet.

A message names where (`pod`, `container NAME`, `init container NAME`, `volume NAME`) and the
control it breaks, in brackets: `container triton: allowPrivilegeEscalation must be false
[Privilege Escalation]`. `object_violations` finds the pod specs inside a workload (Pod,
Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, KServe InferenceService) and prefixes
each message with the object, so a rendered chart or the operator's children are checked alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

Spec = Mapping[str, Any]

# Baseline "Capabilities": what a container may add (the container runtime's default set).
BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
# Restricted "Capabilities": drop ALL, add back at most this.
RESTRICTED_ADD = frozenset({"NET_BIND_SERVICE"})
# Baseline "Sysctls": the safe, namespaced set.
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
# Baseline "SELinux": the types a pod may ask for.
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
# Restricted "Volume Types": core volume types and those defined through PersistentVolumes.
RESTRICTED_VOLUMES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
SECCOMP_ALLOWED = frozenset({"RuntimeDefault", "Localhost"})
APPARMOR_ALLOWED = frozenset({"RuntimeDefault", "Localhost"})

APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"
SECCOMP_POD_ANNOTATION = "seccomp.security.alpha.kubernetes.io/pod"
SECCOMP_CONTAINER_ANNOTATION = "container.seccomp.security.alpha.kubernetes.io/"


def containers(pod_spec: Spec) -> Iterator[tuple[str, Spec]]:
    """Every container of the pod with how a message names it: init, ephemeral and regular."""
    for field, label in (
        ("initContainers", "init container"),
        ("containers", "container"),
        ("ephemeralContainers", "ephemeral container"),
    ):
        for container in pod_spec.get(field) or []:
            yield f"{label} {container.get('name', '?')}", container


def _context(container: Spec) -> Spec:
    return container.get("securityContext") or {}


def _pod_context(pod_spec: Spec) -> Spec:
    return pod_spec.get("securityContext") or {}


def _windows(pod_spec: Spec) -> bool:
    """The standard exempts Windows pods (spec.os.name) from the Linux-only restricted controls."""
    return ((pod_spec.get("os") or {}).get("name")) == "windows"


# --- Baseline ------------------------------------------------------------------------------------


def host_process(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    rule = "[HostProcess]"
    if (_pod_context(pod_spec).get("windowsOptions") or {}).get("hostProcess"):
        yield f"pod: securityContext.windowsOptions.hostProcess must be false or unset {rule}"
    for where, c in containers(pod_spec):
        if (_context(c).get("windowsOptions") or {}).get("hostProcess"):
            yield f"{where}: securityContext.windowsOptions.hostProcess must be false or unset {rule}"


def host_namespaces(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(field):
            yield f"pod: {field} must be false or unset [Host Namespaces]"


def privileged(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    for where, c in containers(pod_spec):
        if _context(c).get("privileged"):
            yield f"{where}: securityContext.privileged must be false or unset [Privileged Containers]"


def baseline_capabilities(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    for where, c in containers(pod_spec):
        extra = sorted(set((_context(c).get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES)
        if extra:
            yield f"{where}: capabilities.add {extra} beyond the default set [Capabilities (Baseline)]"


def host_path_volumes(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    for volume in pod_spec.get("volumes") or []:
        if "hostPath" in volume:
            yield f"volume {volume.get('name', '?')}: hostPath volumes are forbidden [HostPath Volumes]"


def host_ports(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    for where, c in containers(pod_spec):
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                yield f"{where}: hostPort {port['hostPort']} must be 0 or unset [Host Ports]"


def apparmor(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    rule = "[AppArmor]"
    kind = (_pod_context(pod_spec).get("appArmorProfile") or {}).get("type")
    if kind is not None and kind not in APPARMOR_ALLOWED:
        yield f"pod: securityContext.appArmorProfile.type {kind} is not RuntimeDefault or Localhost {rule}"
    for where, c in containers(pod_spec):
        kind = (_context(c).get("appArmorProfile") or {}).get("type")
        if kind is not None and kind not in APPARMOR_ALLOWED:
            yield f"{where}: securityContext.appArmorProfile.type {kind} is not RuntimeDefault or Localhost {rule}"
    for key, value in annotations.items():
        if (
            key.startswith(APPARMOR_ANNOTATION)
            and value != "runtime/default"
            and not str(value).startswith("localhost/")
        ):
            yield (
                f"container {key.removeprefix(APPARMOR_ANNOTATION)}: annotation {key}={value} is not "
                f"runtime/default or localhost/* {rule}"
            )


def _selinux_problems(options: Spec) -> list[str]:
    out = []
    if options.get("type") not in (None, *SELINUX_TYPES):
        out.append(f"seLinuxOptions.type {options['type']} is not a container type")
    out.extend(f"seLinuxOptions.{field} must be unset" for field in ("user", "role") if options.get(field))
    return out


def selinux(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    for problem in _selinux_problems(_pod_context(pod_spec).get("seLinuxOptions") or {}):
        yield f"pod: {problem} [SELinux]"
    for where, c in containers(pod_spec):
        for problem in _selinux_problems(_context(c).get("seLinuxOptions") or {}):
            yield f"{where}: {problem} [SELinux]"


def proc_mount(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    for where, c in containers(pod_spec):
        mount = _context(c).get("procMount")
        if mount not in (None, "Default"):
            yield f"{where}: securityContext.procMount {mount} must be Default or unset [/proc Mount Type]"


def baseline_seccomp(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    rule = "[Seccomp (Baseline)]"
    if (_pod_context(pod_spec).get("seccompProfile") or {}).get("type") == "Unconfined":
        yield f"pod: seccompProfile.type must not be Unconfined {rule}"
    for where, c in containers(pod_spec):
        if (_context(c).get("seccompProfile") or {}).get("type") == "Unconfined":
            yield f"{where}: seccompProfile.type must not be Unconfined {rule}"
    for key, value in annotations.items():
        if (key == SECCOMP_POD_ANNOTATION or key.startswith(SECCOMP_CONTAINER_ANNOTATION)) and value == "unconfined":
            yield f"pod: annotation {key}=unconfined {rule}"


def sysctls(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    for sysctl in _pod_context(pod_spec).get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            yield f"pod: sysctl {sysctl.get('name')} is not in the safe set [Sysctls]"


# --- Restricted ----------------------------------------------------------------------------------


def volume_types(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    for volume in pod_spec.get("volumes") or []:
        kinds = sorted(set(volume) - {"name"} - RESTRICTED_VOLUMES)
        if kinds:
            yield f"volume {volume.get('name', '?')}: {', '.join(kinds)} is not an allowed volume type [Volume Types]"


def privilege_escalation(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    if _windows(pod_spec):
        return
    for where, c in containers(pod_spec):
        if _context(c).get("allowPrivilegeEscalation") is not False:
            yield f"{where}: securityContext.allowPrivilegeEscalation must be false [Privilege Escalation]"


def running_as_non_root(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    rule = "[Running as Non-root]"
    pod_value = _pod_context(pod_spec).get("runAsNonRoot")
    if pod_value is False:
        yield f"pod: securityContext.runAsNonRoot must be true {rule}"
    for where, c in containers(pod_spec):
        value = _context(c).get("runAsNonRoot")
        if value is False or (value is None and pod_value is not True):
            yield f"{where}: runAsNonRoot must be true (here or at the pod level) {rule}"


def running_as_non_root_user(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    rule = "[Running as Non-root user]"
    if _pod_context(pod_spec).get("runAsUser") == 0:
        yield f"pod: securityContext.runAsUser must not be 0 {rule}"
    for where, c in containers(pod_spec):
        if _context(c).get("runAsUser") == 0:
            yield f"{where}: securityContext.runAsUser must not be 0 {rule}"


def non_root_groups(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    rule = "[Non-root groups]"
    pod = _pod_context(pod_spec)
    for field in ("runAsGroup", "fsGroup"):
        if pod.get(field) == 0:
            yield f"pod: securityContext.{field} must not be 0 {rule}"
    if 0 in (pod.get("supplementalGroups") or []):
        yield f"pod: securityContext.supplementalGroups must not contain 0 {rule}"
    for where, c in containers(pod_spec):
        if _context(c).get("runAsGroup") == 0:
            yield f"{where}: securityContext.runAsGroup must not be 0 {rule}"


def restricted_seccomp(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    if _windows(pod_spec):
        return
    rule = "[Seccomp (Restricted)]"
    pod_type = (_pod_context(pod_spec).get("seccompProfile") or {}).get("type")
    if pod_type is not None and pod_type not in SECCOMP_ALLOWED:
        yield f"pod: seccompProfile.type {pod_type} is not RuntimeDefault or Localhost {rule}"
    for where, c in containers(pod_spec):
        kind = (_context(c).get("seccompProfile") or {}).get("type")
        if kind is None and pod_type in SECCOMP_ALLOWED:
            continue
        if kind not in SECCOMP_ALLOWED:
            yield f"{where}: seccompProfile.type must be RuntimeDefault or Localhost (here or at the pod level) {rule}"


def restricted_capabilities(pod_spec: Spec, annotations: Spec) -> Iterator[str]:
    if _windows(pod_spec):
        return
    rule = "[Capabilities (Restricted)]"
    for where, c in containers(pod_spec):
        capabilities = _context(c).get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            yield f"{where}: capabilities.drop must include ALL {rule}"
        extra = sorted(set(capabilities.get("add") or []) - RESTRICTED_ADD)
        if extra:
            yield f"{where}: capabilities.add {extra}: only NET_BIND_SERVICE may be added {rule}"


Rule = Callable[[Spec, Spec], Iterator[str]]
BASELINE: tuple[Rule, ...] = (
    host_process,
    host_namespaces,
    privileged,
    baseline_capabilities,
    host_path_volumes,
    host_ports,
    apparmor,
    selinux,
    proc_mount,
    baseline_seccomp,
    sysctls,
)
RESTRICTED: tuple[Rule, ...] = (
    *BASELINE,
    volume_types,
    privilege_escalation,
    running_as_non_root,
    running_as_non_root_user,
    non_root_groups,
    restricted_seccomp,
    restricted_capabilities,
)

# The controls' names as messages end with them, Baseline's then Restricted's.
CONTROLS = (
    "HostProcess",
    "Host Namespaces",
    "Privileged Containers",
    "Capabilities (Baseline)",
    "HostPath Volumes",
    "Host Ports",
    "AppArmor",
    "SELinux",
    "/proc Mount Type",
    "Seccomp (Baseline)",
    "Sysctls",
    "Volume Types",
    "Privilege Escalation",
    "Running as Non-root",
    "Running as Non-root user",
    "Non-root groups",
    "Seccomp (Restricted)",
    "Capabilities (Restricted)",
)


def violations(pod_spec: Spec, annotations: Spec | None = None) -> list[str]:
    """Every way `pod_spec` (a PodSpec, or a KServe predictor, which inlines one) breaks the
    restricted profile; `annotations` are the pod's (AppArmor and seccomp annotations). Empty:
    the pod passes."""
    return [message for rule in RESTRICTED for message in rule(pod_spec, annotations or {})]


def pod_specs(obj: Spec) -> Iterator[tuple[str, Spec, Spec]]:
    """(where, pod spec, pod annotations) of every pod template inside a Kubernetes object."""
    kind, name = obj.get("kind", "?"), (obj.get("metadata") or {}).get("name", "?")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        yield f"Pod {name}", spec, (obj.get("metadata") or {}).get("annotations") or {}
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        template = spec.get("template") or {}
        yield f"{kind} {name}", template.get("spec") or {}, (template.get("metadata") or {}).get("annotations") or {}
    elif kind == "CronJob":
        template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
        yield f"{kind} {name}", template.get("spec") or {}, (template.get("metadata") or {}).get("annotations") or {}
    elif kind == "InferenceService":
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        for component in ("predictor", "transformer", "explainer"):
            if component in spec:
                yield f"InferenceService {name} {component}", spec[component], annotations
        for i, canary in enumerate(spec.get("canary") or []):
            for component in ("predictor", "transformer", "explainer"):
                if component in canary:
                    yield f"InferenceService {name} canary[{i}] {component}", canary[component], annotations


def object_violations(obj: Spec) -> list[str]:
    """`violations` of every pod template in `obj`, each prefixed with the object it is in."""
    return [
        f"{where}: {message}"
        for where, spec, annotations in pod_specs(obj)
        for message in violations(spec, annotations)
    ]
