"""A bounded load generator for canary tests and benchmarks.

It plays the two sides a canary needs: the router (ranking requests split between a stable and a
canary predictor by a share the caller sets, as the Gateway's weights or the Service's replica
ratio would) and the users (click feedback posted for every answer, with a click probability per
variant). It counts at the client what each variant served, per share ("epoch"), so a test can
check that the canary never served more than its step.

Routing is exact, not random: within an epoch the canary gets a request only while its count
stays at or below `share × requests`, so a 10 % step never serves 11 % by chance. Clicks are
spread evenly too (error diffusion): the click rate of any window is the chosen probability within
one click, so a 20 % lower canary is told from noise in seconds, not minutes.

Requests use the v2 (Open Inference Protocol) REST body; the request id that feedback names
comes from the answer's `parameters.request_id` (or its `id`).

Beside the generator, what the canary tests and `bench/rollout.py` share: `CanaryRig` (a Redis
store per variant, the two `mmrank predictor serve` processes, a Prometheus scraping both),
`Router` (routes the generator by the traffic the operator writes to `status.canary`),
`Controllers` (the Deployment, Job and KServe controllers the test apiserver does not run) and
`Throttle` (a process paused in a duty cycle: a slow store).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx


@dataclasses.dataclass(frozen=True)
class Target:
    """One variant: the predictor's `--ranker-version` and its base URL."""

    variant: str
    url: str
    click_probability: float = 0.1


@dataclasses.dataclass
class Tally:
    """What one variant did, counted at the client."""

    sent: int = 0
    ok: int = 0
    client_errors: int = 0
    server_errors: int = 0
    unanswered: int = 0  # timeout or connection refused
    impressions: int = 0
    clicks: int = 0
    feedback_failed: int = 0
    latencies_ms: list[float] = dataclasses.field(default_factory=list)

    def copy(self) -> Tally:
        return dataclasses.replace(self, latencies_ms=list(self.latencies_ms))

    @property
    def click_rate(self) -> float | None:
        return self.clicks / self.impressions if self.impressions else None


@dataclasses.dataclass
class Epoch:
    """A span during which the canary share stayed the same; counts at routing time."""

    share: float
    started: float  # time.monotonic()
    sent: int = 0
    canary_sent: int = 0
    canary_ok: int = 0
    stable_ok: int = 0

    @property
    def canary_fraction(self) -> float:
        return self.canary_sent / self.sent if self.sent else 0.0


class ClickSampler:
    """Clicks for a number of impressions at probability p, spread evenly (error diffusion)."""

    def __init__(self, probability: float) -> None:
        self.probability = probability
        self._owed = 0.0

    def clicks(self, impressions: int) -> int:
        self._owed += self.probability * impressions
        clicks = min(impressions, int(self._owed))
        self._owed -= clicks
        return clicks


def route_to_canary(share: float, sent: int, canary_sent: int) -> bool:
    """Should the next request of an epoch go to the canary? Keeps canary/sent at or below share."""
    return canary_sent + 1 <= share * (sent + 1) + 1e-9


def v2_body(user_id: int, candidates: list[int], history: list[int]) -> dict[str, Any]:
    def tensor(name: str, data: list[int]) -> dict[str, Any]:
        return {"name": name, "datatype": "INT64", "shape": [len(data)], "data": data}

    return {"inputs": [tensor("user_id", [user_id]), tensor("candidates", candidates), tensor("history", history)]}


def request_id_of(answer: Any) -> str | None:
    if not isinstance(answer, dict):
        return None
    parameters = answer.get("parameters") or {}
    found = parameters.get("request_id") or answer.get("request_id") or answer.get("id")
    return found if isinstance(found, str) else None


class LoadGenerator:
    """Paced ranking requests (at most `rate` per second, `concurrency` in flight) with feedback.

    `canary_share` may be changed while it runs (a test follows the operator's trafficPercent);
    each change starts a new `Epoch`. `run()` and `start()` are bounded by time and by count.
    """

    def __init__(
        self,
        stable: Target,
        canary: Target,
        *,
        rate: float = 40.0,
        concurrency: int = 4,
        model_name: str = "ranker",
        catalogue: int = 100,
        n_users: int = 20,
        candidates: int = 20,
        history: int = 10,
        impressions: int = 10,
        timeout: float = 2.0,
        canary_share: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= canary_share <= 1.0:
            raise ValueError(f"canary_share must be within [0, 1], got {canary_share}")
        if impressions > candidates:
            raise ValueError(f"impressions ({impressions}) cannot exceed candidates ({candidates})")
        self.targets = {"stable": stable, "canary": canary}
        self.rate, self.concurrency, self.model_name = rate, concurrency, model_name
        self.catalogue, self.n_users, self.candidates, self.history = catalogue, n_users, candidates, history
        self.impressions, self.timeout, self.seed = impressions, timeout, seed
        self.tallies = {stable.variant: Tally(), canary.variant: Tally()}
        self.samplers = {t.variant: ClickSampler(t.click_probability) for t in (stable, canary)}
        self.epochs = [Epoch(canary_share, time.monotonic())]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._client = httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=2 * concurrency))

    # --- what a test changes while it runs -----------------------------------------------------
    @property
    def canary_share(self) -> float:
        return self.epochs[-1].share

    @canary_share.setter
    def canary_share(self, share: float) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"canary_share must be within [0, 1], got {share}")
        with self._lock:
            if share != self.epochs[-1].share:
                self.epochs.append(Epoch(share, time.monotonic()))

    def set_click_probability(self, variant: str, probability: float) -> None:
        with self._lock:
            self.samplers[variant].probability = probability

    def snapshot(self) -> tuple[dict[str, Tally], list[Epoch]]:
        with self._lock:
            return ({k: v.copy() for k, v in self.tallies.items()}, [dataclasses.replace(e) for e in self.epochs])

    # --- running -------------------------------------------------------------------------------
    def run(self, seconds: float, max_requests: int | None = None) -> dict[str, Tally]:
        """Send load for `seconds` (or until `max_requests`), then return the tallies."""
        self.start(seconds, max_requests)
        self.join()
        return self.snapshot()[0]

    def start(
        self, seconds: float, max_requests: int | None = None, on_error: Callable[[BaseException], None] | None = None
    ) -> None:
        if self._threads:
            raise RuntimeError("this load generator is running already")
        self._stop.clear()
        started = time.monotonic()
        deadline = started + seconds
        limit = max_requests if max_requests is not None else int(self.rate * seconds) + 1
        slots = iter(range(limit))
        for index in range(self.concurrency):
            worker = threading.Thread(
                target=self._worker,
                name=f"mmrank-load-{index}",
                daemon=True,
                args=(random.Random(self.seed * 1000 + index), started, deadline, slots),
            )
            worker.start()
            self._threads.append(worker)

    def stop(self) -> dict[str, Tally]:
        self._stop.set()
        self.join()
        return self.snapshot()[0]

    def join(self) -> None:
        for worker in self._threads:
            worker.join()
        self._threads.clear()

    def close(self) -> None:
        self.stop()
        self._client.close()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_slot(self, slots: Any, started: float, deadline: float) -> bool:
        """Wait for the next paced slot; False when the run is over."""
        with self._lock:
            index = next(slots, None)
        if index is None:
            return False
        due = started + index / self.rate
        if due >= deadline:
            return False
        self._stop.wait(max(0.0, due - time.monotonic()))
        return not self._stop.is_set()

    def _worker(self, rng: random.Random, started: float, deadline: float, slots: Any) -> None:
        while self._next_slot(slots, started, deadline):
            with self._lock:
                epoch = self.epochs[-1]
                side = "canary" if route_to_canary(epoch.share, epoch.sent, epoch.canary_sent) else "stable"
                epoch.sent += 1
                epoch.canary_sent += side == "canary"
                target = self.targets[side]
                self.tallies[target.variant].sent += 1
            self._one_request(rng, target, epoch, side)

    def _one_request(self, rng: random.Random, target: Target, epoch: Epoch, side: str) -> None:
        items = rng.sample(range(self.catalogue), self.candidates + self.history)
        body = v2_body(rng.randrange(self.n_users), items[: self.candidates], items[self.candidates :])
        began = time.perf_counter()
        try:
            response = self._client.post(f"{target.url}/v2/models/{self.model_name}/infer", json=body)
        except httpx.HTTPError:
            with self._lock:
                self.tallies[target.variant].unanswered += 1
            return
        elapsed_ms = 1000 * (time.perf_counter() - began)
        with self._lock:
            tally = self.tallies[target.variant]
            tally.latencies_ms.append(elapsed_ms)
            if response.status_code >= 500:
                tally.server_errors += 1
            elif response.status_code >= 400:
                tally.client_errors += 1
            else:
                tally.ok += 1
                if side == "canary":
                    epoch.canary_ok += 1
                else:
                    epoch.stable_ok += 1
        if response.status_code < 300:
            self._feedback(target, response)

    def _feedback(self, target: Target, response: httpx.Response) -> None:
        try:
            request_id = request_id_of(response.json())
        except ValueError:
            request_id = None
        with self._lock:
            clicks = self.samplers[target.variant].clicks(self.impressions)
        if request_id is None:
            with self._lock:
                self.tallies[target.variant].feedback_failed += 1
            return
        try:
            answer = self._client.post(
                f"{target.url}/v1/feedback",
                json={"request_id": request_id, "impressions": self.impressions, "clicks": clicks},
            )
            delivered = answer.status_code < 300
        except httpx.HTTPError:
            delivered = False
        with self._lock:
            tally = self.tallies[target.variant]
            if delivered:
                tally.impressions += self.impressions
                tally.clicks += clicks
            else:
                tally.feedback_failed += 1


# --- the predictors it drives: a stable and a canary `mmrank predictor serve` ----------------


def prepare_space(
    store_url: str, space: str = "e1", dim: int = 16, catalogue: int = 100, seed: int = 1, scope: str | None = None
) -> None:
    """A fully embedded space of random unit vectors: every candidate the generator sends is found.
    `scope` "namespace/name": the ranker whose space it is (the operator reads coverage there);
    None: the local default, which the rig's predictors read."""
    import numpy as np

    from mmrank.store import DEFAULT_SCOPE, Scope, open_store

    vectors = np.random.default_rng(seed).normal(size=(catalogue, dim)).astype(np.float32)
    store = open_store(store_url, Scope.parse(scope) if scope else DEFAULT_SCOPE)
    try:
        store.create_space(space, dim)
        store.set_catalogue_size(space, catalogue)
        store.put(space, np.arange(catalogue), vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
        store.report_backfill(space, "0/1", catalogue, catalogue)  # as a finished backfill: coverage 1.0
    finally:
        store.close()


def write_ranker(directory: Path, space: str = "e1", dim: int = 16, catalogue: int = 100, seed: int = 0) -> Path:
    """An untrained ranker artifact pinned to `space` (seconds cheaper than training one)."""
    import numpy as np

    from mmrank.predictors.artifact import write_random_ranker

    features = np.stack([np.arange(catalogue) % 5, np.arange(catalogue) % 7], axis=1)
    write_random_ranker(directory, space, dim=dim, item_features=features, history_length=20, n_users=50, seed=seed)
    return directory


def start_predictor(
    model_dir: Path,
    store_url: str,
    variant: str,
    workdir: Path | None = None,
    space: str = "e1",
    model_name: str = "ranker",
    extra_args: tuple[str, ...] = (),
    timeout: float = 180.0,
) -> Any:
    """`mmrank predictor serve` as its own process (and session), labelled `variant`, once ready.

    Returns a `harness.servers.Server`; raises `ServerUnavailable` with its log when it never
    became ready."""
    import os
    import subprocess
    import sys
    import tempfile

    from harness import servers

    workdir = workdir or Path(tempfile.mkdtemp(prefix=f"mmrank-predictor-{variant}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    port = servers.free_port()
    argv = [
        sys.executable,
        "-m",
        "mmrank",
        "predictor",
        "serve",
        "--model-dir",
        str(model_dir),
        "--model-name",
        model_name,
        "--host",
        "127.0.0.1",
        "--http-port",
        str(port),
        "--grpc-port",
        str(servers.free_port()),
        "--recheck-seconds",
        "0.5",
        "--torch-threads",
        "1",
        *extra_args,
    ]
    env = {**os.environ, "MMRANK_STORE_URL": store_url, "MMRANK_SPACE": space, "MMRANK_RANKER_VERSION": variant}
    log_path = workdir / f"predictor-{variant}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True
        )
    server = servers.Server(
        f"predictor {variant}", process, log_path, f"http://127.0.0.1:{port}", port, workdir, extra={"variant": variant}
    )
    servers.wait_until(server, lambda: servers.http_ok(f"{server.url}/v2/models/{model_name}/ready"), timeout, "ready")
    return server


class Throttle:
    """Pauses a process in a duty cycle (SIGSTOP/SIGCONT): it runs `running` of every `period`
    seconds. On the canary's Redis it makes a slow store, and every ranking request waits for one
    store round trip: a canary that answers correctly, slowly. Always resumes the process on exit."""

    def __init__(self, pid: int, running: float = 0.005, period: float = 0.1) -> None:
        if not 0 < running < period:
            raise ValueError(f"running ({running}) must be within (0, period={period})")
        self.pid, self.running, self.period = pid, running, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._cycle, name="mmrank-throttle", daemon=True)

    def _cycle(self) -> None:
        import os
        import signal

        try:
            while not self._stop.is_set():
                os.kill(self.pid, signal.SIGCONT)
                self._stop.wait(self.running)
                if self._stop.is_set():
                    break
                os.kill(self.pid, signal.SIGSTOP)
                self._stop.wait(self.period - self.running)
        except ProcessLookupError:
            return
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)

    def __enter__(self) -> Throttle:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class CanaryRig:
    """Everything a canary analysis reads, for real: a Redis store per variant (so the canary's can
    be stopped alone), a ranker artifact per variant, the two predictors, and a Prometheus
    scraping both every `scrape_interval`. `stop()` ends them all."""

    def __init__(self, workdir: Path, stable: str = "r1", canary: str = "r2", scrape_interval: str = "1s") -> None:
        from concurrent.futures import ThreadPoolExecutor

        from harness import servers

        self.variants = (stable, canary)
        self.started: list[Any] = []
        try:
            self.stores = {v: servers.start_redis(workdir / f"redis-{v}") for v in self.variants}
            self.started += self.stores.values()
            for store in self.stores.values():
                prepare_space(store.url)
            artifacts = {v: write_ranker(workdir / f"ranker-{v}", seed=i) for i, v in enumerate(self.variants)}
            with ThreadPoolExecutor(2) as pool:
                futures = [
                    pool.submit(start_predictor, artifacts[v], self.stores[v].url, v, workdir / f"predictor-{v}")
                    for v in self.variants
                ]
                errors = []
                self.predictors = {}
                for variant, future in zip(self.variants, futures, strict=False):
                    try:
                        self.predictors[variant] = future.result()
                        self.started.append(self.predictors[variant])
                    except servers.ServerUnavailable as exc:
                        errors.append(f"predictor {variant}: {exc}")
                if errors:
                    raise servers.ServerUnavailable("; ".join(errors))
            self.prometheus = servers.start_prometheus(
                [f"127.0.0.1:{p.port}" for p in self.predictors.values()], workdir / "prometheus", scrape_interval
            )
            self.started.append(self.prometheus)
            self._wait_for_targets()
        except BaseException:
            self.stop()
            raise

    @property
    def stable(self) -> Any:
        return self.predictors[self.variants[0]]

    @property
    def canary(self) -> Any:
        return self.predictors[self.variants[1]]

    def servers(self) -> list[Any]:
        return list(self.started)

    def serve_ranker(self, namespace: str, name: str) -> None:
        """Label both predictors' series as the pods of ranker `namespace/name` (what the
        operator's canary analysis selects by), from the next scrape on."""
        from harness import servers
        from mmrank.operator.analysis import ranker_series

        servers.relabel_prometheus(self.prometheus, ranker_series(namespace, name))

    def _wait_for_targets(self, timeout: float = 30.0) -> None:
        from harness import servers

        url = f"{self.prometheus.url}/api/v1/query"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
                result = httpx.get(url, params={"query": 'count(up{job="mmrank"} == 1)'}, timeout=2).json()
                if result["data"]["result"] and result["data"]["result"][0]["value"][1] == "2":
                    return
            time.sleep(0.2)
        raise servers.ServerUnavailable(f"Prometheus never scraped both predictors within {timeout:.0f} s")

    def generator(
        self,
        rate: float = 30.0,
        canary_click: float = 0.1,
        stable_click: float = 0.1,
        share: float = 0.0,
        **options: Any,
    ) -> LoadGenerator:
        stable, canary = self.variants
        return LoadGenerator(
            Target(stable, self.stable.url, stable_click),
            Target(canary, self.canary.url, canary_click),
            rate=rate,
            canary_share=share,
            **options,
        )

    def stop_canary_store(self) -> None:
        """The canary's Redis down: every ranking request needs a vector read, so it answers 503."""
        self.stores[self.variants[1]].stop()

    def restart_canary_store(self) -> None:
        """Back on the same port and append-only file: the space is there again."""
        from harness import servers

        store = self.stores[self.variants[1]]
        restarted = servers.start_redis(store.workdir, port=store.port)
        store.process, store.log_path = restarted.process, restarted.log_path

    def wait_canary_ready(self, timeout: float = 30.0) -> None:
        from harness import servers

        deadline = time.monotonic() + timeout
        while not servers.http_ok(f"{self.canary.url}/v2/models/ranker/ready"):
            if time.monotonic() > deadline:
                raise servers.ServerUnavailable(f"the canary was not ready again within {timeout:.0f} s")
            time.sleep(0.2)

    def stop(self) -> None:
        for server in reversed(self.started):
            with contextlib.suppress(Exception):
                server.stop()
        self.started.clear()


def answered(url: str, variant: str) -> int:
    """Ranking requests a predictor says it answered (its own `mmrank_requests_total`, any code),
    read from its /metrics with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "mmrank_requests":
            total += sum(
                s.value
                for s in family.samples
                if s.name == "mmrank_requests_total" and s.labels.get("variant") == variant
            )
    return int(total)


# --- the router: traffic by what the operator wrote ------------------------------------------


def canary_share(status: Mapping[str, Any], canary_variant: str) -> float:
    """The share of requests the serving backend gives `canary_variant`, read from a ranker's
    status: the canary's `trafficPercent` while it is Progressing or AwaitingPromotion, all of it
    once Promoted or stable, nothing once RolledBack (or before any canary)."""
    canary = status.get("canary") or {}
    if canary.get("rankerVersion") == canary_variant:
        state = canary.get("state")
        if state in ("Progressing", "AwaitingPromotion"):
            return min(100, max(0, int(canary.get("trafficPercent") or 0))) / 100
        if state == "Promoted":
            return 1.0
        if state == "RolledBack":
            return 0.0
    return 1.0 if (status.get("stable") or {}).get("rankerVersion") == canary_variant else 0.0


@dataclasses.dataclass(frozen=True)
class Sample:
    """The router's view at one moment."""

    at: float  # time.monotonic()
    stable: str | None
    state: str | None
    step: int | None
    traffic_percent: int | None
    share: float


class Router:
    """Polls a ranker's status and routes the generator by it (as KServe's or the Service's split
    would), recording every change in `timeline`."""

    def __init__(
        self,
        read_status: Callable[[], Mapping[str, Any]],
        generator: LoadGenerator,
        canary_variant: str,
        poll: float = 0.1,
    ) -> None:
        self.read_status, self.generator, self.canary_variant, self.poll = read_status, generator, canary_variant, poll
        self.timeline: list[Sample] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="mmrank-router", daemon=True)

    def sample(self, status: Mapping[str, Any]) -> Sample:
        canary = status.get("canary") or {}
        ours = canary.get("rankerVersion") == self.canary_variant
        return Sample(
            time.monotonic(),
            (status.get("stable") or {}).get("rankerVersion"),
            canary.get("state") if ours else None,
            canary.get("step") if ours else None,
            canary.get("trafficPercent") if ours else None,
            canary_share(status, self.canary_variant),
        )

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                now = self.sample(self.read_status())
            except Exception:  # noqa: BLE001 - an unanswered read keeps the last split
                self.errors += 1
            else:
                self.generator.canary_share = now.share
                last = self.timeline[-1] if self.timeline else None
                if last is None or dataclasses.replace(last, at=0) != dataclasses.replace(now, at=0):
                    self.timeline.append(now)
            self._stop.wait(self.poll)

    def first(self, predicate: Callable[[Sample], bool]) -> Sample | None:
        return next((s for s in list(self.timeline) if predicate(s)), None)

    def __enter__(self) -> Router:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- the controllers a bare apiserver lacks ---------------------------------------------------


def ready_status(kind: str, live: Mapping[str, Any], now: str) -> dict[str, Any] | None:
    """The status a Deployment, Job or InferenceService controller would report once the object's
    current generation is up and ready (None: it already says so)."""
    status, generation = live.get("status") or {}, live["metadata"].get("generation")
    if kind == "Deployment":
        n = live["spec"].get("replicas", 1)
        if status.get("observedGeneration") == generation and status.get("readyReplicas") == n:
            return None
        return {
            "observedGeneration": generation,
            "replicas": n,
            "updatedReplicas": n,
            "readyReplicas": n,
            "availableReplicas": n,
        }
    if kind == "Job":
        if status.get("succeeded"):
            return None
        return {
            "succeeded": live["spec"].get("completions", 1),
            "startTime": now,
            "completionTime": now,
            "conditions": [{"type": "Complete", "status": "True", "lastProbeTime": now, "lastTransitionTime": now}],
        }
    if status.get("observedGeneration") == generation:
        return None
    return {
        "observedGeneration": generation,
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
    }


class Controllers:
    """Plays the Deployment, Job and KServe controllers of one namespace on an apiserver that runs
    none (the test apiserver): every child is reported ready for its current generation."""

    KINDS = (("apps/v1", "Deployment"), ("batch/v1", "Job"), ("serving.kserve.io/v1beta1", "InferenceService"))

    def __init__(self, api_client: Any, namespace: str, period: float = 0.2) -> None:
        from kubernetes import dynamic

        self.client = dynamic.DynamicClient(api_client)
        self.namespace, self.period = namespace, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._play, name="mmrank-controllers", daemon=True)

    def _play(self) -> None:
        import datetime

        while not self._stop.wait(self.period):
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            for api_version, kind in self.KINDS:
                with contextlib.suppress(Exception):  # a conflict or a vanished object: next round
                    resource = self.client.resources.get(api_version=api_version, kind=kind)
                    for live in resource.get(namespace=self.namespace).to_dict()["items"]:
                        ready = ready_status(kind, live, now)
                        if ready is not None:
                            resource.status.patch(
                                name=live["metadata"]["name"],
                                namespace=self.namespace,
                                body={"status": ready},
                                content_type="application/merge-patch+json",
                            )

    def __enter__(self) -> Controllers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
