"""The project's container images, built on this machine and loaded into the local node.

No registry can be reached here, so the images come from our own Dockerfile built with Debian's
buildah (overlay storage; `MMRANK_BUILDAH_DRIVER=vfs` where overlay mounts are not allowed, about
a minute per Dockerfile step on the runtime image) on a bookworm root filesystem made by debootstrap, and reach containerd as
OCI archives (`buildah push ... oci-archive:`, `ctr images import`). Each archive is named by a
hash of everything its build reads, so a second build with the same inputs is a file lookup.

Elsewhere a plain `docker build --target operator .` keeps working with the Dockerfile's
python:3.11-slim default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from harness.servers import CACHE

ROOT = Path(__file__).resolve().parent.parent
IMAGE_DIR = CACHE / "images"
BUILDAH_DRIVER = os.environ.get("MMRANK_BUILDAH_DRIVER", "overlay")
BUILDAH_ROOT = CACHE / "buildah" / BUILDAH_DRIVER
WHEELS = Path("/opt/wheels")  # torch's CPU wheel on this disk, when it is there
DEBIAN_MIRROR = os.environ.get("MMRANK_DEBIAN_MIRROR", "http://deb.debian.org/debian")

# The debootstrap base: Debian bookworm's python3 (3.11) and what `python3 -m venv` needs.
BASE_NAME = "localhost/mmrank/bookworm-python"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
PAUSE_NAME = "localhost/mmrank/pause:3.4"


class ImageBuildError(RuntimeError):
    """An image could not be built; the message carries the failing command's output tail."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One Dockerfile target: the name the cluster runs it under and the files its build reads."""

    target: str
    name: str
    inputs: tuple[str, ...]


COMMON_INPUTS = ("Dockerfile", ".dockerignore", "requirements.lock", "pyproject.toml", "README.md", "mmrank")
TARGETS: dict[str, Target] = {
    "operator": Target(
        "operator", "ghcr.io/mmrank/mmrank-operator:0.1.0", (*COMMON_INPUTS, "operator", "encoders/triton_config.py")
    ),
    "runtime": Target("runtime", "ghcr.io/mmrank/mmrank:0.1.0", (*COMMON_INPUTS, "operator", "encoders", "predictors")),
    "triton": Target(
        "triton",
        "ghcr.io/mmrank/mmrank-triton:0.1.0",
        (*COMMON_INPUTS, "operator", "encoders", "predictors", "tools/prepare_triton_backends.py", "images/triton"),
    ),
}


def input_files(root: Path, inputs: Iterable[str]) -> list[Path]:
    """Every file under `inputs` (relative to `root`), sorted, without caches or compiled files."""
    files: list[Path] = []
    for entry in inputs:
        path = root / entry
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(
                p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            )
    return sorted(set(files))


def content_key(root: Path, inputs: Iterable[str], extra: Sequence[str] = ()) -> str:
    """A hash of the inputs' paths and bytes and of `extra` (target, base image, build args)."""
    digest = hashlib.sha256()
    for item in extra:
        digest.update(item.encode() + b"\0")
    for path in input_files(root, inputs):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _run(argv: Sequence[str], what: str, **kwargs: Any) -> str:
    """`argv`'s stdout; `kwargs` go to subprocess.run as they are."""
    result: subprocess.CompletedProcess[str] = subprocess.run(list(argv), capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        raise ImageBuildError(f"{what} failed ({' '.join(map(str, argv[:4]))} ...):\n{tail}")
    return result.stdout


def buildah(*args: str, what: str = "buildah", **kwargs: object) -> str:
    binary = shutil.which("buildah")
    if binary is None:
        raise ImageBuildError("buildah is not installed: ./dev.sh cluster up installs Debian's buildah")
    BUILDAH_ROOT.mkdir(parents=True, exist_ok=True)
    return _run([*_buildah_argv(binary), *args], what, **kwargs)


def _buildah_argv(binary: str) -> list[str]:
    return [
        binary,
        "--storage-driver",
        BUILDAH_DRIVER,
        "--root",
        str(BUILDAH_ROOT / "storage"),
        "--runroot",
        str(BUILDAH_ROOT / "run"),
    ]


def _image_exists(name: str) -> bool:
    try:
        buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", name)
        return True
    except ImageBuildError:
        return False


def base_image() -> str:
    """The bookworm base (debootstrap, minbase + python3), built once; returns its name:tag."""
    key = hashlib.sha256(f"bookworm minbase {' '.join(BASE_PACKAGES)}".encode()).hexdigest()[:12]
    name = f"{BASE_NAME}:{key}"
    if _image_exists(name):
        return name
    with tempfile.TemporaryDirectory(prefix="mmrank-debootstrap-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(
            [
                "nice",
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                "bookworm",
                str(rootfs),
                DEBIAN_MIRROR,
            ],
            "debootstrap",
        )
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        container = buildah("from", "scratch", what="buildah from").strip()
        try:
            mount = buildah("mount", container).strip()
            _run(["cp", "-a", f"{rootfs}/.", f"{mount}/"], "copying the root filesystem")
            buildah(
                "config",
                "--env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--cmd",
                "/bin/bash",
                container,
            )
            buildah("commit", "--rm", container, name, what="buildah commit (base)")
        except BaseException:
            subprocess.run([*_buildah_argv("buildah"), "rm", container], capture_output=True)
            raise
    return name


def pause_archive() -> Path:
    """The pod sandbox image: Kubernetes' pause.c (images/pause) compiled statically, alone."""
    source = ROOT / "images" / "pause" / "pause.c"
    key = content_key(ROOT, ["images/pause"], ["pause"])
    archive = IMAGE_DIR / f"pause-{key}.tar"
    if archive.exists():
        return archive
    IMAGE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mmrank-pause-") as tmp:
        binary = Path(tmp) / "pause"
        _run(["cc", "-Os", "-static", "-DVERSION=3.4-mmrank", "-o", str(binary), str(source)], "compiling pause.c")
        container = buildah("from", "scratch").strip()
        buildah("copy", container, str(binary), "/pause")
        buildah("config", "--entrypoint", '["/pause"]', "--user", "65535:65535", container)
        buildah("commit", "--rm", container, PAUSE_NAME)
    _push(PAUSE_NAME, archive)
    return archive


def _push(name: str, archive: Path) -> None:
    tmp = archive.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    buildah("push", "--disable-compression", name, f"oci-archive:{tmp}:{name}", what=f"buildah push {name}")
    tmp.rename(archive)


def build_args(base: str) -> list[str]:
    """Build arguments for this machine: the debootstrap base, torch from /opt/wheels (no index
    beyond PyPI is reachable here), and this machine's CA bundle for pip."""
    args = ["--build-arg", f"BASE_IMAGE={base}", "--build-arg", "TORCH_INDEX="]
    ca_bundle = Path(
        os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt"
    )
    if ca_bundle.is_file():
        args += [
            "--build-arg",
            "PIP_CERT=/etc/mmrank-build-ca.crt",
            "--volume",
            f"{ca_bundle}:/etc/mmrank-build-ca.crt:ro",
        ]
    if WHEELS.is_dir():
        args += ["--build-arg", "PIP_FIND_LINKS=/wheels", "--volume", f"{WHEELS}:/wheels:ro"]
    return args


def archive_for(target: str, root: Path = ROOT) -> tuple[Path, str]:
    """(the archive a build of `target` from `root` would write, its content key)."""
    spec = TARGETS[target]
    base = base_image()
    base_id = buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", base).strip()
    key = content_key(root, spec.inputs, [target, base_id, " ".join(build_args(base))])
    return IMAGE_DIR / f"{target}-{key}.tar", key


def build(target: str, root: Path = ROOT, log: Path | None = None) -> Path:
    """Build one Dockerfile target (cached by content) and return its OCI archive."""
    if target not in TARGETS:
        raise ImageBuildError(f"unknown image target {target!r}; one of {', '.join(TARGETS)}")
    archive, key = archive_for(target, root)
    if archive.exists():
        return archive
    IMAGE_DIR.mkdir(parents=True, exist_ok=True)
    spec = TARGETS[target]
    base = base_image()
    # --layers keeps the dependency install of `runtime` as a cached step, so a code change
    # rebuilds only the layers after it (and `triton` reuses all of `runtime`).
    argv = [
        "build",
        "--layers",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "-f",
        str(root / "Dockerfile"),
        "--target",
        spec.target,
        "-t",
        spec.name,
        *build_args(base),
        str(root),
    ]
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log or os.devnull, "w") as out:
        binary = shutil.which("buildah") or "buildah"
        result = subprocess.run(["nice", *_buildah_argv(binary), *argv], stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = Path(log).read_text(errors="replace").splitlines()[-40:] if log else []
        raise ImageBuildError(f"buildah build --target {target} failed (exit {result.returncode}):\n" + "\n".join(tail))
    _push(spec.name, archive)
    return archive


def prune_archives(keep: Iterable[Path]) -> None:
    """Remove older archives of the targets in `keep` (each is hundreds of MB); archives of other
    targets stay."""
    keep = {Path(p) for p in keep}
    targets = {path.name.split("-")[0] for path in keep}
    for path in IMAGE_DIR.glob("*.tar"):
        if path not in keep and path.name.split("-")[0] in targets:
            path.unlink(missing_ok=True)
