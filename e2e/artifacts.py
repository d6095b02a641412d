"""What the quick start makes, laid out as the claim `mmrank-artifacts` the local node serves.

    catalogue/            the tiny shop (the backfill Jobs read it)
    encoders/e1, e2       Triton model repositories (`mmrank encoders export --backend python`)
    rankers/r1            SimTier + MAKE on space e1
    rankers/r2            SimTier + MAKE on space e2 (the encoder upgrade)
    rankers/r3            the ID-only ranker labelled r3 on space e2 (the canary users like less)

Every step is the `mmrank` command `harness/demo.py` shows; training is tiny (seconds). The tree
is built once per key (the commands and the code they run) under the cache, so a second scenario
run only finds it: `python -m e2e.artifacts` prints its path.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from harness import images
from harness.servers import CACHE

ROOT = Path(__file__).resolve().parent.parent
ENCODER_STEPS = 30


def commands(out: Path) -> list[list[str]]:
    """The `mmrank` commands that make the tree under `out` (work files under out/.work)."""
    work, shop = out / ".work", out / "catalogue"
    steps = [["shop", "generate", "--size", "tiny", "--seed", "0", "--out", str(shop), "--no-progress"]]
    for version, seed in (("e1", 0), ("e2", 1)):
        checkpoint = work / f"encoder-{version}"
        steps += [
            [
                "encoders",
                "train",
                "--data",
                str(shop),
                "--objective",
                "scl",
                "--out",
                str(checkpoint),
                "--steps",
                str(ENCODER_STEPS),
                "--seed",
                str(seed),
                "--threads",
                "1",
                "--no-progress",
            ],
            [
                "encoders",
                "export",
                "--checkpoint",
                str(checkpoint),
                "--repo",
                str(out / "encoders" / version),
                "--version",
                "1",
                "--backend",
                "python",
                "--max-batch-size",
                "64",
            ],
            [
                "encoders",
                "embed",
                "--data",
                str(shop),
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(work / f"space-{version}"),
                "--version",
                version,
                "--threads",
                "1",
            ],
        ]
    for ranker, space, variant in (("r1", "e1", "simtier-make"), ("r2", "e2", "simtier-make"), ("r3", "e2", "id")):
        steps.append(
            [
                "ranker",
                "train",
                "--data",
                str(shop),
                "--embeddings",
                str(work / f"space-{space}"),
                "--variant",
                variant,
                "--version",
                ranker,
                "--out",
                str(out / "rankers" / ranker),
                "--threads",
                "1",
                "--make-epochs",
                "1",
            ]
        )
    return steps


def key() -> str:
    code = images.content_key(
        ROOT, ["encoders", "predictors", "mmrank/shop.py", "mmrank/shop_gen.py", "mmrank/space.py", "e2e/artifacts.py"]
    )
    return hashlib.sha256(f"{code} {commands(Path('/'))}".encode()).hexdigest()[:12]


def build(log=print) -> Path:  # type: ignore[no-untyped-def]
    """The artifact tree (built once per key); world-readable, since pods read it as uid 10001."""
    out = CACHE / "e2e" / f"artifacts-{key()}"
    if (out / ".complete").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for argv in commands(out):
        log("$ mmrank " + " ".join(argv))
        result = subprocess.run([sys.executable, "-m", "mmrank", *argv], cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`mmrank {' '.join(argv)}` failed:\n{(result.stdout + result.stderr)[-3000:]}")
    shutil.rmtree(out / ".work")
    for path in [out, *out.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    (out / ".complete").touch()
    return out


if __name__ == "__main__":
    print(build(log=lambda line: print(line, file=sys.stderr, flush=True)))
