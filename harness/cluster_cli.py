"""`mmrank cluster up|down|status` (the local node) and `mmrank images build` (the Dockerfile's
targets, built here with buildah). `./dev.sh cluster ...` installs the Debian packages first."""

from __future__ import annotations

import argparse
import json
import sys

TARGETS = ("operator", "runtime", "triton")  # the Dockerfile's targets (harness.images.TARGETS, without its imports)


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cluster = subparsers.add_parser(
        "cluster",
        help="A single-node Kubernetes cluster on this machine (root; Debian's containerd, the project's images)",
    )
    commands = cluster.add_subparsers(dest="cluster_command", metavar="COMMAND", required=True)
    up = commands.add_parser("up", help="Start it (or find it running); prints the KUBECONFIG path")
    up.add_argument(
        "--image",
        action="append",
        choices=("operator", "runtime", "triton"),
        default=None,
        help="Dockerfile targets to build and load (default: operator and runtime)",
    )
    up.set_defaults(handler=_up)
    commands.add_parser("down", help="Stop it and remove everything it made").set_defaults(handler=_down)
    commands.add_parser("status", help="Which parts run; exit 1 unless the node is Ready").set_defaults(handler=_status)

    images = subparsers.add_parser("images", help="Build the project's images with buildah (cached by content)")
    sub = images.add_subparsers(dest="images_command", metavar="COMMAND", required=True)
    build = sub.add_parser("build", help="Build targets into OCI archives; prints each archive's path")
    build.add_argument(
        "targets",
        nargs="*",
        metavar="TARGET",
        type=_target,
        default=list(TARGETS),
        help=f"Dockerfile targets: {', '.join(TARGETS)} (default: all)",
    )
    build.set_defaults(handler=_build)


def _target(name: str) -> str:
    if name not in TARGETS:
        raise argparse.ArgumentTypeError(f"{name!r} is not a target ({', '.join(TARGETS)})")
    return name


def _up(args: argparse.Namespace) -> int:
    from harness import cluster

    try:
        kubeconfig = cluster.up(
            images=args.image or ("operator", "runtime"), log=lambda message: print(message, file=sys.stderr)
        )
    except (cluster.ClusterError, Exception) as exc:
        print(f"mmrank cluster up: {exc}", file=sys.stderr)
        return 1
    print(kubeconfig)
    return 0


def _down(args: argparse.Namespace) -> int:
    from harness import cluster

    left = cluster.down(log=lambda message: print(message, file=sys.stderr))
    return 1 if left else 0


def _status(args: argparse.Namespace) -> int:
    from harness import cluster

    state = cluster.status()
    print(json.dumps(state, indent=1))
    return 0 if state["healthy"] else 1


def _build(args: argparse.Namespace) -> int:
    from harness import images

    try:
        for target in args.targets:
            print(images.build(target, log=images.IMAGE_DIR / f"build-{target}.log"))
    except images.ImageBuildError as exc:
        print(f"mmrank images build: {exc}", file=sys.stderr)
        return 1
    return 0
