"""Real servers on free loopback ports: Triton, Redis, Prometheus, etcd + kube-apiserver.

Tests, benchmarks and the quick start use the same launchers. Each `start_*` returns a
`Server` whose `stop()` ends the process; a launcher whose binary is missing raises
`ServerUnavailable` naming what is missing and how `./dev.sh` installs it (never a silent skip).
Binaries built by `./dev.sh` live in `$MMRANK_BIN_DIR` (default ~/.cache/mmrank/bin).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

CACHE = Path(os.environ.get("MMRANK_CACHE", Path.home() / ".cache" / "mmrank"))
BIN_DIR = Path(os.environ.get("MMRANK_BIN_DIR", CACHE / "bin"))


class ServerUnavailable(RuntimeError):
    """A real server could not be started: its binary is missing or it never became ready."""


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_binary(name: str, hint: str, extra_dirs: Sequence[Path] = ()) -> str:
    for directory in (*extra_dirs, BIN_DIR):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise ServerUnavailable(f"`{name}` was not found (looked in {BIN_DIR} and PATH): {hint}")


@dataclasses.dataclass
class Server:
    """A running server process with its log file; `url` is what clients connect to."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str
    port: int
    workdir: Path
    extra: dict[str, object] = dataclasses.field(default_factory=dict)
    cleanup: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def _kill_group(self) -> None:
        """SIGKILL whatever is left of the server's process group (each server starts its own
        session): Triton's Python-backend stubs outlive a killed tritonserver otherwise."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def kill(self) -> None:
        """Kill -9, as a crash would (the server and its helper processes); `stop()` still cleans up."""
        if self.alive():
            self._kill_group()
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._kill_group()
        for step in reversed(self.cleanup):
            step()
        self.cleanup.clear()
        if self.workdir in _TEMPORARY_WORKDIRS:
            _TEMPORARY_WORKDIRS.discard(self.workdir)
            shutil.rmtree(self.workdir, ignore_errors=True)


def _launch(
    name: str, argv: Sequence[str], workdir: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = workdir / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    process = subprocess.Popen(
        list(argv),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        env=env if env is not None else os.environ.copy(),
        start_new_session=True,
    )
    log.close()
    return process, log_path


def wait_until(server: Server, ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise ServerUnavailable(
                f"{server.name} exited with code {server.process.returncode} before {what}; "
                f"log {server.log_path}:\n{server.log_tail()}"
            )
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.1)
    server.stop()
    raise ServerUnavailable(f"{server.name} was not {what} within {timeout:.0f} s; log:\n{server.log_tail()}")


def http_ok(url: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None) -> bool:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            status: int = response.status
            return 200 <= status < 300
    except urllib.error.URLError:
        return False


_TEMPORARY_WORKDIRS: set[Path] = set()


def _workdir(name: str, workdir: Path | None) -> Path:
    """The caller's folder (kept: a restart reuses it), or a temporary one `stop()` removes."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        return workdir
    temporary = Path(tempfile.mkdtemp(prefix=f"mmrank-{name}-"))
    _TEMPORARY_WORKDIRS.add(temporary)
    return temporary


# --- Triton -----------------------------------------------------------------------------------


def triton_paths() -> tuple[Path, Path, Path]:
    """(tritonserver binary, its shared libraries, the backend directory with our stub)."""
    try:
        import pytriton
    except ImportError as exc:  # pragma: no cover - the lock installs it
        raise ServerUnavailable("the nvidia-pytriton wheel is not installed: run ./dev.sh setup") from exc
    root = Path(pytriton.__file__).parent
    binary = root / "tritonserver" / "bin" / "tritonserver"
    libs = root.parent / "nvidia_pytriton.libs"
    backends = CACHE / "triton" / "backends"
    if not binary.exists():
        raise ServerUnavailable(f"tritonserver binary missing from the nvidia-pytriton wheel: {binary}")
    if not (backends / "python" / "triton_python_backend_stub").exists():
        raise ServerUnavailable(
            f"Triton's Python backend with the stub for this Python is missing under {backends}: "
            "run ./dev.sh setup (tools/prepare_triton_backends.py)"
        )
    return binary, libs, backends


def start_triton(
    model_repository: Path,
    workdir: Path | None = None,
    timeout: float = 120.0,
    http_port: int | None = None,
    grpc_port: int | None = None,
    extra_args: Sequence[str] = (),
) -> Server:
    """Start tritonserver on loopback ports. Python-backend models run with the `python3` first
    on PATH, so this process's interpreter directory goes first (numpy < 2 and torch there)."""
    binary, libs, backends = triton_paths()
    workdir = _workdir("triton", workdir)
    http_port = http_port or free_port()
    grpc_port = grpc_port or free_port()
    metrics_port = free_port()
    env = os.environ.copy()
    env["LD_LIBRARY_PATH"] = f"{libs}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else str(libs)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    argv = [
        str(binary),
        f"--model-repository={model_repository}",
        f"--backend-directory={backends}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--allow-metrics=true",
        "--allow-gpu-metrics=false",
        "--exit-on-error=true",
        "--strict-readiness=true",
        *extra_args,
    ]
    process, log_path = _launch("triton", argv, workdir, env)
    server = Server(
        "triton",
        process,
        log_path,
        f"127.0.0.1:{http_port}",
        http_port,
        workdir,
        extra={
            "grpc_url": f"127.0.0.1:{grpc_port}",
            "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics",
            "model_repository": str(model_repository),
        },
    )
    wait_until(server, lambda: http_ok(f"http://127.0.0.1:{http_port}/v2/health/ready"), timeout, "ready")
    return server


# --- Redis ------------------------------------------------------------------------------------


def start_redis(
    workdir: Path | None = None, port: int | None = None, appendonly: bool = True, timeout: float = 20.0
) -> Server:
    """Redis with an append-only file in `workdir`, so a restart on the same workdir and port
    keeps every acknowledged write (what the fault tests rely on)."""
    binary = find_binary("redis-server", "install Debian's redis-server (./dev.sh setup does)")
    workdir = _workdir("redis", workdir)
    port = port or free_port()
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(workdir),
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--appendfsync",
        "always",
        "--protected-mode",
        "no",
        "--daemonize",
        "no",
    ]
    process, log_path = _launch("redis", argv, workdir)
    server = Server("redis", process, log_path, f"redis://127.0.0.1:{port}/0", port, workdir)

    def ping() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    wait_until(server, ping, timeout, "answering PING")
    return server


# --- Prometheus -------------------------------------------------------------------------------


def start_prometheus(
    scrape_targets: Sequence[str],
    workdir: Path | None = None,
    scrape_interval: str = "1s",
    timeout: float = 60.0,
    labels: Mapping[str, str] | None = None,
) -> Server:
    """Prometheus scraping `host:port` targets (job `mmrank`) every `scrape_interval`. `labels`:
    target labels on every series, as pod discovery's relabelling gives a ranker's pods
    (`namespace`, `mmrank_io_ranker`: what the operator's queries select a ranker by);
    `relabel_prometheus` changes them on the running server."""
    binary = find_binary("prometheus", "install Debian's prometheus (./dev.sh setup does)")
    workdir = _workdir("prometheus", workdir)
    port = free_port()
    config = workdir / "prometheus.yml"
    _write_prometheus_config(config, scrape_targets, scrape_interval, labels)
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
    ]
    process, log_path = _launch("prometheus", argv, workdir)
    server = Server("prometheus", process, log_path, f"http://127.0.0.1:{port}", port, workdir)
    server.extra.update(targets=list(scrape_targets), scrape_interval=scrape_interval)
    wait_until(server, lambda: http_ok(f"{server.url}/-/ready"), timeout, "ready")
    return server


def relabel_prometheus(server: Server, labels: Mapping[str, str] | None, timeout: float = 30.0) -> None:
    """New target labels for a `start_prometheus` server, reloaded in place; returns once a
    scrape carries them on every target. Series scraped before keep their old labels."""
    config = server.workdir / "prometheus.yml"
    targets = cast(list[str], server.extra["targets"])
    _write_prometheus_config(config, targets, str(server.extra["scrape_interval"]), labels)
    request = urllib.request.Request(f"{server.url}/-/reload", method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    selector = ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items()))
    query = urllib.parse.urlencode({"query": f"count(up{{{selector}}} == 1)"})

    def scraped() -> bool:
        with urllib.request.urlopen(f"{server.url}/api/v1/query?{query}", timeout=5) as answer:
            result = json.load(answer)["data"]["result"]
        return bool(result) and int(result[0]["value"][1]) >= len(targets)

    wait_until(server, scraped, timeout, f"scraping its {len(targets)} targets with labels {selector}")


def _write_prometheus_config(
    config: Path, targets: Sequence[str], scrape_interval: str, labels: Mapping[str, str] | None
) -> None:
    listed = ", ".join(f"'{t}'" for t in targets)
    labelled = "".join(f"\n          {k}: {json.dumps(v)}" for k, v in sorted((labels or {}).items()))
    config.write_text(
        f"global:\n  scrape_interval: {scrape_interval}\n  evaluation_interval: {scrape_interval}\n"
        f"scrape_configs:\n  - job_name: mmrank\n    static_configs:\n      - targets: [{listed}]\n"
        + (f"        labels:{labelled}\n" if labelled else "")
    )


# --- etcd + kube-apiserver --------------------------------------------------------------------


def start_etcd(workdir: Path | None = None, timeout: float = 30.0) -> Server:
    binary = find_binary("etcd", "install Debian's etcd-server (./dev.sh setup does)")
    workdir = _workdir("etcd", workdir)
    port, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        binary,
        "--data-dir",
        str(workdir / "data"),
        "--listen-client-urls",
        url,
        "--advertise-client-urls",
        url,
        "--listen-peer-urls",
        f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls",
        f"http://127.0.0.1:{peer}",
        "--initial-cluster",
        f"default=http://127.0.0.1:{peer}",
        "--log-level",
        "warn",
    ]
    env = os.environ.copy()
    env.setdefault("ETCD_UNSUPPORTED_ARCH", "")
    process, log_path = _launch("etcd", argv, workdir, env)
    server = Server("etcd", process, log_path, url, port, workdir)
    wait_until(server, lambda: http_ok(f"{url}/health"), timeout, "healthy")
    return server


def _service_account_keys(workdir: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = workdir / "sa.key"
    public = workdir / "sa.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def write_kubeconfig(path: Path, server_url: str, token: str) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: mmrank-test\n  cluster:\n"
        f"    server: {server_url}\n    insecure-skip-tls-verify: true\n"
        "users:\n- name: admin\n  user:\n"
        f"    token: {token}\n"
        "contexts:\n- name: mmrank-test\n  context: {cluster: mmrank-test, user: admin, namespace: default}\n"
        "current-context: mmrank-test\n"
    )
    return path


def start_kube_apiserver(workdir: Path | None = None, timeout: float = 120.0) -> Server:
    """etcd plus kube-apiserver (RBAC on, a static admin token, generated service-account keys).

    No controllers run: tests play the Deployment, Job and KServe controllers themselves.
    `extra["kubeconfig"]` is a kubeconfig for the admin token; `extra["token"]` the token.
    """
    binary = find_binary(
        "kube-apiserver",
        "run ./dev.sh setup, which builds it from Debian's kubernetes source package (tools/build-kube-apiserver.sh)",
    )
    workdir = _workdir("apiserver", workdir)
    etcd = start_etcd(workdir / "etcd")
    try:
        token = base64.b32encode(os.urandom(20)).decode().lower().rstrip("=")
        (workdir / "tokens.csv").write_text(f"{token},admin,admin,system:masters\n")
        private, public = _service_account_keys(workdir)
        port = free_port()
        argv = [
            binary,
            f"--etcd-servers={etcd.url}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            "--advertise-address=127.0.0.1",
            f"--cert-dir={workdir / 'certs'}",
            f"--token-auth-file={workdir / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-account-key-file={public}",
            f"--service-account-signing-key-file={private}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--api-audiences=https://kubernetes.default.svc",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            "--v=0",
        ]
        process, log_path = _launch("kube-apiserver", argv, workdir)
    except BaseException:
        etcd.stop()
        raise
    url = f"https://127.0.0.1:{port}"
    kubeconfig = write_kubeconfig(workdir / "kubeconfig", url, token)
    server = Server(
        "kube-apiserver",
        process,
        log_path,
        url,
        port,
        workdir,
        extra={"token": token, "kubeconfig": str(kubeconfig), "etcd": etcd},
    )
    server.cleanup.append(etcd.stop)
    import ssl

    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    try:
        wait_until(
            server, lambda: http_ok(f"{url}/readyz", {"Authorization": f"Bearer {token}"}, insecure), timeout, "ready"
        )
    except BaseException:
        etcd.stop()
        raise
    return server


# --- CRDs for the apiserver we can build -----------------------------------------------------


def _drop_empty_string_defaults(node: object) -> object:
    if isinstance(node, dict):
        return {k: _drop_empty_string_defaults(v) for k, v in node.items() if not (k == "default" and v == "")}
    if isinstance(node, list):
        return [_drop_empty_string_defaults(v) for v in node]
    return node


def kserve_crds_for_k8s_1_20(schema_dir: Path) -> list[dict[str, Any]]:
    """KServe's CRDs as Kubernetes 1.20 accepts them.

    KServe's controller-gen output carries `default: ""` on many string fields; the 1.20
    apiserver rejects those CRDs (a defaulted empty string fails its own validation there).
    Exactly those entries are removed; every other part of the schema is kept.
    """
    import yaml

    crds = []
    for path in sorted(Path(schema_dir).glob("serving.kserve.io_*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                crds.append(_drop_empty_string_defaults(doc))
    return crds  # type: ignore[return-value]  # each document is a mapping, so each result is a dict


def shared_dir() -> Path:
    """The read-only `shared/` beside the checkout (DESIGN.md, KServe schemas)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "shared", here.parent / "shared"):
        if (candidate / "schemas" / "kserve").is_dir():
            return candidate
    raise ServerUnavailable(f"shared/schemas/kserve not found beside {here}")


def install_crds(
    api_client: object, crds: list[dict[str, Any]], timeout: float = 60.0, field_manager: str = "mmrank-harness"
) -> None:
    """Server-side apply CRDs and wait until each is Established."""
    from kubernetes import dynamic

    client = dynamic.DynamicClient(api_client)
    api = client.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
    for crd in crds:
        api.server_side_apply(body=crd, name=crd["metadata"]["name"], field_manager=field_manager, force_conflicts=True)
    deadline = time.monotonic() + timeout
    for crd in crds:
        name = crd["metadata"]["name"]
        while True:
            conditions = (api.get(name=name).to_dict().get("status") or {}).get("conditions") or []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"CRD {name} not Established within {timeout:.0f} s: {conditions}")
            time.sleep(0.2)
