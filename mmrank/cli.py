"""The `mmrank` command. Each part registers its own subcommands.

A part's `register_cli(subparsers)` adds parsers whose handlers import the heavy modules
(torch, kopf) only when they run, so `mmrank --help` is quick and the operator never loads torch.
A command imports only the part that owns it, and a part absent from an image (the operator image
has no encoders or predictors) is left out of `--help` instead of breaking every command.

Bad input (arguments, missing or malformed files, unreachable servers) ends as one line on stderr
and a non-zero exit, never a traceback: argparse errors are one line (`Parser`), and whatever a
handler raises is reported as `mmrank COMMAND: what went wrong` by `main`. `MMRANK_DEBUG=1` lets
the traceback through, for whoever debugs mmrank itself.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

# (module, the commands it adds) in the order `mmrank --help` lists them.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mmrank.shop_cli", ("shop",)),
    ("mmrank.fetch", ("fetch",)),
    ("mmrank.encoders.cli", ("encoders", "embedder", "backfill")),
    ("mmrank.predictors.cli", ("ranker", "predictor")),
    ("mmrank.api_cli", ("crd", "validate")),
    ("mmrank.operator.cli", ("operator", "render")),
    ("harness.cluster_cli", ("cluster", "images")),  # the checkout's test harness: in no wheel or image
)
T = TypeVar("T")
DEBUG_ENV = "MMRANK_DEBUG"
MAX_MESSAGE = 800  # characters of the one error line; pydantic and YAML messages can be long


class CommandError(Exception):
    """Bad input a handler found; its message is the whole line the user sees."""


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (the usage itself is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- argument types: a bad value is reported by argparse as `argument --x: ...` -------------------

_GO_PART = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)"
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_seconds(text: str) -> float:
    """Seconds from a number (`30`, `0.05`) or a Go duration (`1h30m`, `90s`, `2m30s`, `500ms`)."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        if not re.fullmatch(f"(?:{_GO_PART})+", text):
            raise ValueError(f"{text!r} is not a duration (seconds, or like 90s, 2m30s, 1h30m, 500ms)") from None
        seconds = sum(float(count) * _GO_UNITS[unit] for count, unit in re.findall(_GO_PART, text))
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"{text!r} is not a duration (seconds, or like 90s, 2m30s, 1h30m, 500ms)")
    return seconds


def _argument_type(name: str, check: Callable[[str], T]) -> Callable[[str], T]:
    """A named argparse type from a checking function (argparse names the type in its messages)."""

    def convert(text: str) -> T:
        try:
            return check(text)
        except (ValueError, OSError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert


def _int_at_least(low: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if value < low:
            raise ValueError(f"{value} is below {low}")
        return value

    return check


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{text} is not a fraction between 0 and 1")
    return value


def _float_above(low: float, inclusive: bool) -> Callable[[str], float]:
    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not (value >= low if inclusive else value > low) or value == float("inf"):
            raise ValueError(f"{text} is not a {'non-negative' if inclusive else 'positive'} number")
        return value

    return check


def _positive(parse: Callable[[str], float]) -> Callable[[str], float]:
    def check(text: str) -> float:
        value = parse(text)
        if not value > 0:
            raise ValueError(f"{text!r} is not above zero")
        return value

    return check


def _port(text: str) -> int:
    value = _int_at_least(0)(text)
    if value > 65535:
        raise ValueError(f"{value} is not a TCP port (0..65535)")
    return value


def _existing_dir(text: str) -> str:
    """The path as given (handlers take it as they did), once it is known to be a directory."""
    path = Path(text)
    if not path.is_dir():
        raise ValueError(f"{text}: {'not a directory' if path.exists() else 'no such directory'}")
    return text


def _existing_file(text: str) -> str:
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"{text}: {'not a file' if path.exists() else 'no such file'}")
    return text


positive_int = _argument_type("positive whole number", _int_at_least(1))
non_negative_int = _argument_type("whole number", _int_at_least(0))
fraction = _argument_type("fraction", _fraction)
positive_float = _argument_type("positive number", _float_above(0.0, inclusive=False))
non_negative_float = _argument_type("number", _float_above(0.0, inclusive=True))
port = _argument_type("port", _port)
duration = _argument_type("duration", parse_seconds)
positive_duration = _argument_type("positive duration", _positive(parse_seconds))
existing_dir = _argument_type("directory", _existing_dir)
existing_file = _argument_type("file", _existing_file)


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar on stderr (default: only when stderr is a terminal)",
    )


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars on a terminal, unless asked otherwise: a pod's log (or a file) gets the
    result lines alone."""
    wanted = getattr(args, "progress", None)
    return sys.stderr.isatty() if wanted is None else bool(wanted)


# --- errors -------------------------------------------------------------------------------------


def describe(exc: BaseException) -> str:
    """One line saying what went wrong, from any exception (its message, its file, its kind)."""
    mark = getattr(exc, "problem_mark", None)  # a YAML syntax error: what, and where
    if mark is not None and getattr(exc, "problem", None):
        text = f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"  # type: ignore[attr-defined]  # a YAML error (problem_mark)
    elif isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        target = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
        text = f"{target}: {exc.strerror}"
    else:
        text = str(exc)
        if isinstance(exc, FileNotFoundError) and text and " " not in text:  # pyarrow: the path, alone
            text = f"{text}: no such file or directory"
        if isinstance(exc, KeyError) and exc.args:
            text = f"missing {exc.args[0]!r}"
        if not text.strip() or not isinstance(exc, (CommandError, ValueError, OSError, LookupError)):
            text = f"{type(exc).__name__}: {text}" if text.strip() else type(exc).__name__
    line = " ".join(text.split())
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."


def file_problem(path: object, exc: BaseException) -> str:
    """`PATH: what is wrong with it`, naming the path once."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else describe(exc)
    return reason if str(path) in reason else f"{path}: {reason}"


def command_name(argv: Sequence[str]) -> str:
    """`mmrank shop generate` from the command line: the words before the first option."""
    words: list[str] = []
    for arg in argv:
        if arg.startswith("-") or len(words) == 2:
            break
        words.append(arg)
    return " ".join(["mmrank", *words])


# --- the parser ---------------------------------------------------------------------------------


def parts_for(argv: Sequence[str]) -> list[str]:
    """The part modules to import for this command line: the one owning its command, or every
    part when no known command is named (`mmrank --help`, a typo that argparse reports)."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    for module_name, commands in PARTS:
        if command in commands:
            return [module_name]
    return [module_name for module_name, _ in PARTS]


def _missing_part(exc: ModuleNotFoundError, module_name: str) -> bool:
    """True when the part itself is not installed (not when the part fails on a missing import)."""
    return exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + "."))


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("mmrank")
    except PackageNotFoundError:
        from mmrank import __version__

        return __version__


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = Parser(
        prog="mmrank",
        description="Multimodal CTR ranking on Kubernetes: data, encoder, ranker, embedder, predictor and operator.",
        epilog=f"A failure is one line on stderr; {DEBUG_ENV}=1 shows its traceback.",
    )
    parser.add_argument("--version", action="version", version=f"mmrank {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = parts_for(list(argv) if argv is not None else sys.argv[1:])
    absent = []
    for module_name in wanted:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not _missing_part(exc, module_name):
                raise
            if len(wanted) == 1:
                raise CommandError(
                    f"{module_name} is not installed here (this image or environment holds other parts of mmrank)"
                ) from exc
            absent.append(module_name)
            continue
        module.register_cli(subparsers)
    if absent:
        parser.epilog = f"not installed here: {', '.join(absent)}. {parser.epilog}"
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    if os.environ.get(DEBUG_ENV):
        return _run(argv)
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print(f"{command_name(argv)}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mmrank crd | head`: the reader left; say nothing more
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        return 141
    except Exception as exc:  # noqa: BLE001 - the one place a failure becomes the user's one line
        print(f"{command_name(argv)}: {describe(exc)}", file=sys.stderr)
        return 1


def _run(argv: list[str]) -> int:
    args = build_parser(argv).parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
