"""`mmrank crd` (the CRD, or the API reference) and `mmrank validate -f FILE`."""

from __future__ import annotations

import argparse
import sys


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    crd = subparsers.add_parser("crd", help="Print the MultimodalRanker CRD generated from the models")
    crd.add_argument(
        "--no-cel",
        action="store_true",
        help="drop CEL x-kubernetes-validations (for Kubernetes < 1.25; the model validators still check them)",
    )
    crd.add_argument("--docs", action="store_true", help="print the API reference (docs/api.md) instead")
    crd.set_defaults(handler=_crd)
    validate = subparsers.add_parser("validate", help="Validate MultimodalRanker manifests with the models")
    validate.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="FILE",
        help="manifest file (YAML, several documents allowed; - for stdin); repeatable",
    )
    validate.set_defaults(handler=_validate)


def _crd(args: argparse.Namespace) -> int:
    from mmrank import api_crd, api_docs

    sys.stdout.write(api_docs.api_reference_markdown() if args.docs else api_crd.crd_yaml(cel=not args.no_cel))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from mmrank import api

    invalid = False
    for filename in args.filename:
        try:
            results = api.validate_file(filename)
        except UnicodeDecodeError as exc:  # reported like any file it cannot read
            results = [(filename, [f"(file): cannot read a YAML manifest: not UTF-8 text ({exc.reason})"])]
        for label, found in results:
            if found:
                invalid = True
                print(f"{label}: invalid")
                for problem in found:
                    print(f"  {' '.join(problem.split())}")  # one line each (YAML errors span several)
            else:
                print(f"{label}: valid")
    return 1 if invalid else 0
