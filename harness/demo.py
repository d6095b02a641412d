"""The local quick start (`./dev.sh demo`): the whole method and system on one machine, in minutes.

1. generate a tiny synthetic shop;
2. pre-train the item encoder with SCL and evaluate it;
3. export it to a Triton model repository and serve it with the real Triton;
4. backfill the catalogue into embedding space `e1` of the embedded (file) store;
5. train the CTR ranker (SimTier + MAKE) on that space and evaluate it against the ID model;
6. serve the ranker with KServe's model server, fed from the store, and rank a user's candidates;
7. run the real-time embedder, post a brand-new item, and time until its vector is in the store;
8. show what the operator would create in a cluster for `examples/minimal.yaml` (`mmrank render`).

Every step is the `mmrank` command a user would type; the commands are printed as they run.
Outputs stay under `runs/demo/` in the checkout.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from harness import servers
from mmrank.shop_config import MATRIX_SHOPS

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8
SCOPE = "demo/shop"  # the ranker the store keys belong to (in a cluster: the MultimodalRanker's namespace/name)


# The quick start's shop: `tiny`'s catalogue (600 items: the encoder trains and backfills in
# seconds) with 1,000 users, so the test day holds ~19,000 impressions and the ranker comparison
# is beyond seed noise (docs/results.md, "The quick start's ranker").
DEMO_SHOP = MATRIX_SHOPS["demo"][1]


def ranker_verdict(id_metrics: dict, mm_metrics: dict) -> str:
    """One line: which ranker won on the test day's GAUC, by how many points, overall and on cold items."""
    gain = 100.0 * (mm_metrics["overall"]["gauc"] - id_metrics["overall"]["gauc"])
    cold = 100.0 * (mm_metrics["cold"]["gauc"] - id_metrics["cold"]["gauc"])
    winner, loser = ("SimTier+MAKE", "ID") if gain > 0 else ("ID", "SimTier+MAKE")
    return (
        f"{winner} beat {loser} on the test day: GAUC {mm_metrics['overall']['gauc']:.3f} vs "
        f"{id_metrics['overall']['gauc']:.3f} ({gain:+.1f} points for SimTier+MAKE; on cold items "
        f"{cold:+.1f} points, {mm_metrics['cold']['gauc']:.3f} vs {id_metrics['cold']['gauc']:.3f})."
    )


def say(step: int, text: str) -> None:
    print(f"\n\033[1m[{step}/{STEPS}] {text}\033[0m", flush=True)


def mmrank(*args: str, capture: bool = False) -> str:
    argv = [sys.executable, "-m", "mmrank", *args]
    print("  $ mmrank " + " ".join(shlex.quote(a) for a in args), flush=True)
    result = subprocess.run(argv, cwd=ROOT, text=True, check=False, stdout=subprocess.PIPE if capture else None)
    if result.returncode != 0:
        raise SystemExit(f"`mmrank {' '.join(args)}` failed with exit code {result.returncode}")
    return result.stdout or ""


def start_background(name: str, args: Sequence[str], workdir: Path) -> subprocess.Popen[bytes]:
    print(f"  $ mmrank {' '.join(shlex.quote(a) for a in args)} &   (log: {workdir / (name + '.log')})", flush=True)
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-m", "mmrank", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def http_json(url: str, body: object | None = None, timeout: float = 30.0) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_http(url: str, timeout: float, what: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"{what} exited ({process.returncode}); last lines of {log}:\n"
                + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            )
        if servers.http_ok(url):
            return
        time.sleep(0.5)
    raise SystemExit(f"{what} was not ready at {url} within {timeout:.0f} s; see {log}")


def png_bytes(image: object) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # type: ignore[arg-type]  # `image`: an array typed object
    return buffer.getvalue()


def run(workdir: Path, encoder_steps: int) -> None:
    import numpy as np

    from mmrank import shop as shop_data
    from mmrank.store import Scope, open_store

    workdir.mkdir(parents=True, exist_ok=True)
    shop, encoder, space_dir = workdir / "shop", workdir / "encoder", workdir / "space-e1"
    repo, ranker, ranker_id = workdir / "triton-repo", workdir / "ranker-simtier-make", workdir / "ranker-id"
    store_url = f"file://{workdir / 'store'}"
    background: list[subprocess.Popen[bytes]] = []
    started: list[servers.Server] = []
    try:
        say(1, "A tiny synthetic shop (1,000 users): items with images and titles, searches, users, clicks")
        shop_config = workdir / "shop-config.json"
        shop_config.write_text(json.dumps(DEMO_SHOP) + "\n")
        mmrank("shop", "generate", "--size", "tiny", "--seed", "0", "--config", str(shop_config), "--out", str(shop))

        say(2, "Pre-train the item encoder with semantic-aware contrastive learning (SCL)")
        mmrank(
            "encoders",
            "train",
            "--data",
            str(shop),
            "--objective",
            "scl",
            "--out",
            str(encoder),
            "--steps",
            str(encoder_steps),
            "--threads",
            "2",
        )
        mmrank("encoders", "eval", "--data", str(shop), "--checkpoint", str(encoder))

        say(3, "Export the encoder as a Triton model repository and serve it with the real Triton")
        mmrank(
            "encoders",
            "export",
            "--checkpoint",
            str(encoder),
            "--repo",
            str(repo),
            "--version",
            "1",
            "--backend",
            "python",
            "--max-batch-size",
            "64",
            "--max-queue-delay-us",
            "2000",
        )
        triton = servers.start_triton(repo, workdir / "triton")
        started.append(triton)
        grpc_url = str(triton.extra["grpc_url"])
        print(f"  Triton ready: HTTP {triton.url}, gRPC {grpc_url}")

        say(4, "Backfill the catalogue into embedding space e1 (one shard of an Indexed Job)")
        mmrank(
            "backfill",
            "run",
            "--space",
            "e1",
            "--shard",
            "0/1",
            "--encoder",
            grpc_url,
            "--store",
            store_url,
            "--scope",
            SCOPE,
            "--catalogue",
            str(shop),
            "--no-progress",
        )
        info = open_store(store_url, Scope.parse(SCOPE)).space_info("e1")
        print(f"  space e1: {info.items} items, coverage {info.coverage:.3f}")

        say(5, "Train the CTR ranker on space e1: SimTier + MAKE, against the ID-only baseline")
        mmrank(
            "encoders",
            "embed",
            "--data",
            str(shop),
            "--checkpoint",
            str(encoder),
            "--out",
            str(space_dir),
            "--version",
            "e1",
        )
        mmrank(
            "ranker",
            "train",
            "--data",
            str(shop),
            "--embeddings",
            str(space_dir),
            "--variant",
            "id",
            "--out",
            str(ranker_id),
            "--threads",
            "2",
        )
        mmrank(
            "ranker",
            "train",
            "--data",
            str(shop),
            "--embeddings",
            str(space_dir),
            "--variant",
            "simtier-make",
            "--max-make-epochs",
            "2",
            "--version",
            "r1",
            "--out",
            str(ranker),
            "--threads",
            "2",
        )
        metrics = {}
        for name, artifact in (("ID", ranker_id), ("SimTier+MAKE", ranker)):
            printed = mmrank(
                "ranker",
                "eval",
                "--data",
                str(shop),
                "--embeddings",
                str(space_dir),
                "--model",
                str(artifact),
                capture=True,
            )
            metrics[name] = json.loads(printed)["metrics"]
        verdict = ranker_verdict(metrics["ID"], metrics["SimTier+MAKE"])
        print("  " + verdict)

        say(6, "Serve the ranker with KServe's model server, fed from the store")
        port = servers.free_port()
        predictor = start_background(
            "predictor",
            [
                "predictor",
                "serve",
                "--model-dir",
                str(ranker),
                "--store",
                store_url,
                "--scope",
                SCOPE,
                "--http-port",
                str(port),
                "--model-name",
                "ranker",
                "--space",
                "e1",
                "--no-feedback-stream",
            ],
            workdir,
        )
        background.append(predictor)
        wait_http(
            f"http://127.0.0.1:{port}/v2/models/ranker/ready",
            180,
            "the predictor",
            predictor,
            workdir / "predictor.log",
        )
        data = shop_data.load(shop)
        user = int(data.impressions["user_id"].iloc[0])
        candidates = [int(i) for i in data.items["item_id"].sample(10, random_state=0)]
        status, answer = http_json(
            f"http://127.0.0.1:{port}/v1/models/ranker:predict", {"user": {"id": user}, "candidates": candidates}
        )
        print(f"  POST /v1/models/ranker:predict for user {user} and 10 candidates -> {status}")
        print("  " + json.dumps(answer)[:600])

        say(7, "Embed a brand-new item in real time (the embedder, Triton, the store)")
        redis = servers.start_redis(workdir / "redis")
        started.append(redis)
        embedder_port = servers.free_port()
        embedder = start_background(
            "embedder",
            [
                "embedder",
                "run",
                "--encoder",
                f"e1={grpc_url}",
                "--store",
                store_url,
                "--scope",
                SCOPE,
                "--redis",
                redis.url,
                "--http-port",
                str(embedder_port),
                "--max-wait",
                "0.05",
            ],
            workdir,
        )
        background.append(embedder)
        wait_http(f"http://127.0.0.1:{embedder_port}/readyz", 120, "the embedder", embedder, workdir / "embedder.log")
        new_id = int(data.items["item_id"].max()) + 1
        image = png_bytes(np.asarray(data.images[0]))
        posted = time.time()
        status, answer = http_json(
            f"http://127.0.0.1:{embedder_port}/items",
            {
                "item_id": new_id,
                "title": str(data.items["title"].iloc[0]) + " new arrival",
                "image": base64.b64encode(image).decode(),
                "event_time": posted,
            },
        )
        print(f"  POST /items (item {new_id}) -> {status} {answer}")
        store = open_store(store_url, Scope.parse(SCOPE))
        found = False
        while time.time() - posted < 60 and not found:
            _, hits = store.get("e1", [new_id])
            found = bool(hits[0])
            time.sleep(0.05)
        if not found:
            raise SystemExit(f"item {new_id} did not reach space e1 within 60 s; see {workdir / 'embedder.log'}")
        print(f"  item {new_id} is in space e1 {time.time() - posted:.2f} s after it was posted")

        say(8, "What the operator creates in a cluster for examples/minimal.yaml")
        import yaml

        for coverage, moment in (
            ("0.4", "while space e1 is backfilled (no traffic yet)"),
            ("1.0", "once e1 reaches minCoverage (the ranker serves)"),
        ):
            print(f"  {moment}:")
            rendered = mmrank(
                "render", "-f", str(ROOT / "examples" / "minimal.yaml"), "--coverage", f"e1={coverage}", capture=True
            )
            for child in yaml.safe_load_all(rendered):
                if child:
                    print(f"    {child['kind']:<22} {child['metadata']['name']}")
        print(
            f"\nDone. {verdict} Outputs are under {workdir}; docs/results.md (\"The quick start's "
            'ranker") has the same comparison over 3 seeds, and the matrix over shops and spaces.'
        )
    finally:
        for process in background:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
        for server in reversed(started):
            server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmrank-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--encoder-steps", type=int, default=300)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run(args.workdir, args.encoder_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
