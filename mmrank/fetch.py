"""`mmrank fetch SOURCE DEST`: the init container that brings an artifact into a pod.

Remote URIs (s3://, gs://, http(s)://, hf://, azure, ...) go through KServe's own storage code
(`kserve_storage.Storage`), with the credentials it reads from the environment (the operator
passes `spec.storage.secretName` as `envFrom`). A local directory (a PersistentVolumeClaim the
operator mounted under /mnt/pvc) is copied, not linked as KServe's local path does, because the
destination is written to afterwards (Triton's config.pbtxt) and the claim is not mounted in the
main container.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def fetch(source: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    local = source.removeprefix("file://")
    if os.path.isdir(local):
        # Entry by entry: copytree onto `dest` itself would copy the source's mode and times onto
        # it, which a non-root pod may not do to its emptyDir's root (EPERM).
        for entry in Path(local).iterdir():
            if entry.is_dir():
                shutil.copytree(entry, dest / entry.name, dirs_exist_ok=True)
            else:
                shutil.copy2(entry, dest / entry.name)
    elif os.path.isfile(local):
        shutil.copy2(local, dest / Path(local).name)
    elif source.startswith(("/", "file://")):
        raise FileNotFoundError(f"{source} does not exist (is the volume mounted?)")
    else:
        from kserve_storage import Storage

        Storage.download(source, str(dest))
    return dest


def summary(dest: Path) -> str:
    files = [p for p in dest.rglob("*") if p.is_file()]
    return f"{len(files)} files, {sum(p.stat().st_size for p in files)} bytes in {dest}"


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "fetch",
        help="Copy a model or catalogue (s3://, gs://, http(s)://, a "
        "mounted path, ...) into a directory, with KServe's storage code",
    )
    parser.add_argument("source", help="URI or local path")
    parser.add_argument("dest", type=Path, help="directory to fill")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import logging

    # KServe's storage code logs the error it then raises; the line below says it once.
    logging.getLogger("storage.initializer").addFilter(lambda record: record.levelno < logging.ERROR)
    try:
        dest = fetch(args.source, args.dest)
    except Exception as exc:  # noqa: BLE001 - an init container's failure is one line for `kubectl logs`
        print(f"error: cannot fetch {args.source}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"fetched {args.source}: {summary(dest)}")
    return 0
