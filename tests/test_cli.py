"""The `mmrank` command never shows a traceback: every subcommand, given bad arguments, missing or
malformed files or a server that is not there, says what is wrong in one line on stderr and exits
non-zero. Each case is a real `python -m mmrank` process; they run in parallel (a few at a time) so
the corpus stays under a minute. Also: `--version`, Go durations (the CRD's interval pattern on the
real apiserver against the parser), progress bars only on a terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import socket
import struct
import subprocess
import sys
import termios
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from mmrank import api, api_crd, cli

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = ROOT / "examples" / "minimal.yaml"
CLOSED = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once


def mmrank(*args: str, env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mmrank", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        env={**os.environ, "KUBECONFIG": "/nonexistent", **(env or {})},
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_files(tmp_path_factory.mktemp("bad"))


def make_files(root: Path) -> dict[str, Path]:
    """Bad files of every kind, and one real tiny shop (for the commands that get past reading it)."""
    made = {
        "missing": root / "missing.yaml",
        "dir": root / "a-directory",
        "text": root / "notes.txt",
        "empty": root / "empty.yaml",
        "bad_json": root / "bad.json",
        "bad_yaml": root / "bad.yaml",
        "binary": root / "binary.yaml",
        "invalid_ranker": root / "invalid.yaml",
        "list_json": root / "list.json",
        "unknown_knob": root / "knob.yaml",
        "kubeconfig_garbage": root / "kubeconfig",
        "kubeconfig_down": root / "kubeconfig-down",
        "shop": root / "shop",
        "checkpoint": root / "checkpoint",
    }
    made["dir"].mkdir()
    made["checkpoint"].mkdir()
    (made["checkpoint"] / "config.json").write_text("{truncated")
    made["text"].write_text("not a manifest, not a shop\n")
    made["empty"].write_text("")
    made["bad_json"].write_text("{not json")
    made["bad_yaml"].write_text("spec: [unclosed\n")
    made["binary"].write_bytes(b"\xff\xfe\x00\x01garbage")
    made["invalid_ranker"].write_text(yaml.safe_dump({**yaml.safe_load(MINIMAL.read_text()), "spec": {}}))
    made["list_json"].write_text("[1, 2]")
    made["unknown_knob"].write_text("no_such_knob: 3\n")
    made["kubeconfig_garbage"].write_text("kube: [what\n")
    made["kubeconfig_down"].write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "clusters": [{"name": "c", "cluster": {"server": f"https://{CLOSED}"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
            }
        )
    )
    shop = mmrank("shop", "generate", "--size", "tiny", "--out", str(made["shop"]))
    assert shop.returncode == 0, f"the tiny shop the corpus needs was not generated: {shop.stderr}"
    return made


def corpus(f: dict[str, Path], taken: int) -> list[tuple[str, list[str], dict[str, str]]]:
    """(what is wrong, argv, environment) for every subcommand; `taken`: a port something listens on."""
    s = {k: str(v) for k, v in f.items()}
    shop, missing, directory = s["shop"], s["missing"], s["dir"]
    cases: list[tuple[str, list[str], dict[str, str]]] = [
        # the command itself
        ("no command", [], {}),
        ("unknown command", ["shopp"], {}),
        ("unknown option", ["--frobnicate"], {}),
        # shop
        ("no --out", ["shop", "generate"], {}),
        ("unknown size", ["shop", "generate", "--size", "huge", "--out", directory], {}),
        ("negative seed", ["shop", "generate", "--seed", "-1", "--out", directory], {}),
        ("seed not a number", ["shop", "generate", "--seed", "x", "--out", directory], {}),
        ("config missing", ["shop", "generate", "--out", directory, "--config", missing], {}),
        ("config malformed JSON", ["shop", "generate", "--out", directory, "--config", s["bad_json"]], {}),
        ("config a list", ["shop", "generate", "--out", directory, "--config", s["list_json"]], {}),
        ("config unknown knob", ["shop", "generate", "--out", directory, "--config", s["unknown_knob"]], {}),
        ("out is a file", ["shop", "generate", "--out", s["text"]], {}),
        ("out under a file", ["shop", "generate", "--out", s["text"] + "/shop"], {}),
        ("data missing", ["shop", "concept-space", "--data", missing, "--out", directory], {}),
        ("data not a shop", ["shop", "concept-space", "--data", directory, "--out", directory + "/s"], {}),
        ("dim zero", ["shop", "concept-space", "--data", shop, "--out", directory, "--dim", "0"], {}),
        ("negative noise", ["shop", "concept-space", "--data", shop, "--out", directory, "--noise", "-1"], {}),
        ("rows zero", ["shop", "grid", "--data", shop, "--out", directory + "/g.png", "--rows", "0"], {}),
        ("data is a file", ["shop", "click-plot", "--data", s["text"], "--out", directory + "/c.png"], {}),
        ("data not a shop", ["shop", "baselines", "--data", directory], {}),
        # fetch
        ("fetch nothing there", ["fetch", missing, directory + "/fetched"], {}),
        ("fetch from a closed port", ["fetch", f"http://{CLOSED}/model.pt", directory + "/fetched"], {}),
        # encoders
        ("train without data", ["encoders", "train", "--out", directory], {}),
        ("train data missing", ["encoders", "train", "--data", missing, "--out", directory], {}),
        ("train zero steps", ["encoders", "train", "--data", shop, "--out", directory, "--steps", "0"], {}),
        ("train negative lr", ["encoders", "train", "--data", shop, "--out", directory, "--lr", "-0.1"], {}),
        ("train unknown objective", ["encoders", "train", "--data", shop, "--out", directory, "--objective", "x"], {}),
        (
            "train backbone not JSON",
            [
                "encoders",
                "train",
                "--data",
                shop,
                "--out",
                directory + "/t",
                "--text-tower",
                "hf",
                "--text-backbone",
                "{bert",
            ],
            {},
        ),
        ("eval data not a shop", ["encoders", "eval", "--data", directory, "--checkpoint", directory], {}),
        ("eval checkpoint missing", ["encoders", "eval", "--data", shop, "--checkpoint", missing], {}),
        ("export checkpoint empty", ["encoders", "export", "--checkpoint", directory, "--repo", directory + "/r"], {}),
        (
            "export checkpoint malformed",
            ["encoders", "export", "--checkpoint", s["checkpoint"], "--repo", directory + "/r"],
            {},
        ),
        (
            "export unknown backend",
            ["encoders", "export", "--checkpoint", directory, "--repo", directory, "--backend", "tf"],
            {},
        ),
        (
            "embed checkpoint empty",
            [
                "encoders",
                "embed",
                "--data",
                shop,
                "--checkpoint",
                directory,
                "--out",
                directory + "/e",
                "--version",
                "e1",
            ],
            {},
        ),
        # embedder and backfill
        ("embedder without a store", ["embedder", "run", "--encoder", f"e1={CLOSED}"], {"MMRANK_STORE_URL": ""}),
        ("embedder encoder malformed", ["embedder", "run", "--store", f"redis://{CLOSED}", "--encoder", "e1"], {}),
        ("embedder duration malformed", ["embedder", "run", "--max-wait", "soon"], {}),
        ("embedder zero claim-idle", ["embedder", "run", "--claim-idle", "0s"], {}),
        ("embedder port out of range", ["embedder", "run", "--http-port", "70000"], {}),
        (
            "backfill without encoder",
            ["backfill", "run", "--space", "e1", "--catalogue", shop],
            {"MMRANK_ENCODER_URL": "", "MMRANK_STORE_URL": ""},
        ),
        (
            "backfill shard out of range",
            [
                "backfill",
                "run",
                "--space",
                "e1",
                "--catalogue",
                shop,
                "--encoder",
                CLOSED,
                "--store",
                f"redis://{CLOSED}",
                "--shard",
                "3/2",
            ],
            {},
        ),
        (
            "backfill shard malformed",
            [
                "backfill",
                "run",
                "--space",
                "e1",
                "--catalogue",
                shop,
                "--encoder",
                CLOSED,
                "--store",
                f"redis://{CLOSED}",
                "--shard",
                "x",
            ],
            {},
        ),
        (
            "backfill catalogue missing",
            [
                "backfill",
                "run",
                "--space",
                "e1",
                "--catalogue",
                missing,
                "--encoder",
                CLOSED,
                "--store",
                f"redis://{CLOSED}",
            ],
            {},
        ),
        (
            "backfill catalogue not a shop",
            [
                "backfill",
                "run",
                "--space",
                "e1",
                "--catalogue",
                directory,
                "--encoder",
                CLOSED,
                "--store",
                "file://" + directory + "/store",
            ],
            {},
        ),
        (
            "backfill encoder unreachable",
            [
                "backfill",
                "run",
                "--space",
                "e1",
                "--catalogue",
                shop,
                "--encoder",
                CLOSED,
                "--store",
                "file://" + directory + "/store",
            ],
            {},
        ),
        ("backfill zero batch", ["backfill", "run", "--space", "e1", "--catalogue", shop, "--batch-size", "0"], {}),
        # ranker and predictor
        ("ranker train data missing", ["ranker", "train", "--data", missing, "--out", directory], {}),
        ("ranker train unknown variant", ["ranker", "train", "--data", shop, "--out", directory, "--variant", "x"], {}),
        (
            "ranker train embeddings missing",
            ["ranker", "train", "--data", shop, "--out", directory, "--embeddings", missing],
            {},
        ),
        (
            "ranker train zero history",
            ["ranker", "train", "--data", shop, "--out", directory, "--history-length", "0"],
            {},
        ),
        ("ranker eval model empty", ["ranker", "eval", "--model", directory, "--data", shop], {}),
        ("ranker table epochs malformed", ["ranker", "table", "--data", shop, "--make-epochs-list", "1,x"], {}),
        ("ranker table json malformed", ["ranker", "table", "--data", shop, "--from-json", s["bad_json"]], {}),
        ("predictor without store", ["predictor", "serve", "--model-dir", directory], {"MMRANK_STORE_URL": ""}),
        ("predictor no artifact", ["predictor", "serve", "--model-dir", directory, "--store", f"redis://{CLOSED}"], {}),
        (
            "predictor port taken",
            [
                "predictor",
                "serve",
                "--host",
                "127.0.0.1",
                "--http-port",
                str(taken),
                "--model-dir",
                directory,
                "--store",
                f"redis://{CLOSED}",
            ],
            {},
        ),
        (
            "predictor gRPC port taken",
            [
                "predictor",
                "serve",
                "--host",
                "127.0.0.1",
                "--grpc-port",
                str(taken),
                "--http-port",
                "0",
                "--model-dir",
                directory,
                "--store",
                f"redis://{CLOSED}",
            ],
            {},
        ),
        (
            "embedder port taken",
            [
                "embedder",
                "run",
                "--http-host",
                "127.0.0.1",
                "--http-port",
                str(taken),
                "--store",
                f"redis://{CLOSED}",
                "--encoder",
                f"e1={CLOSED}",
            ],
            {},
        ),
        ("predictor coverage above 1", ["predictor", "serve", "--min-coverage", "1.5"], {}),
        ("predictor port from env malformed", ["predictor", "serve", "--model-dir", directory], {"PORT": "http"}),
        ("predictor recheck malformed", ["predictor", "serve", "--recheck-seconds", "5 minutes"], {}),
        ("predictor schema to a missing folder", ["predictor", "schema", "--out", directory + "/no/such/s.json"], {}),
        # crd, validate, render, operator
        ("crd unknown option", ["crd", "--yaml"], {}),
        ("validate without -f", ["validate"], {}),
        ("render missing file", ["render", "-f", missing], {}),
        ("render a directory", ["render", "-f", directory], {}),
        ("render malformed YAML", ["render", "-f", s["bad_yaml"]], {}),
        ("render binary", ["render", "-f", s["binary"]], {}),
        ("render invalid ranker", ["render", "-f", s["invalid_ranker"]], {}),
        ("render coverage malformed", ["render", "-f", str(MINIMAL), "--coverage", "e1=lots"], {}),
        ("render coverage above 1", ["render", "-f", str(MINIMAL), "--coverage", "e1=2"], {}),
        ("render coverage without space", ["render", "-f", str(MINIMAL), "--coverage", "=0.5"], {}),
        ("operator interval malformed", ["operator", "run", "--interval", "soon"], {}),
        ("operator interval zero", ["operator", "run", "--interval", "0s"], {}),
        ("operator interval from env malformed", ["operator", "run"], {"MMRANK_OPERATOR_INTERVAL": "often"}),
        ("operator without kubeconfig", ["operator", "run", "--standalone"], {}),
        ("operator kubeconfig malformed", ["operator", "run", "--standalone"], {"KUBECONFIG": s["kubeconfig_garbage"]}),
        ("operator apiserver unreachable", ["operator", "run", "--standalone"], {"KUBECONFIG": s["kubeconfig_down"]}),
        # cluster and images: argument errors only (up and down change this machine)
        ("cluster without action", ["cluster"], {}),
        ("cluster up unknown image", ["cluster", "up", "--image", "nginx"], {}),
        ("images build unknown target", ["images", "build", "nginx"], {}),
    ]
    return cases


# What some lines must say: the cause, not only that something failed.
SAYS = {
    "config unknown knob": "no_such_knob",
    "out is a file": "not a directory",
    "data not a shop": "not a complete shop",
    "train backbone not JSON": "--text-backbone: not JSON",
    "export checkpoint malformed": "is not an encoder checkpoint (config.json",
    "embed checkpoint empty": "is not an encoder checkpoint",
    "backfill catalogue not a shop": "items.parquet: no such file or directory",
    "backfill encoder unreachable": f"encoder {CLOSED}:",
    "backfill shard out of range": "shard index must be in [0, 2), got 3",
    "ranker eval model empty": "no ranker artifact (ranker.json missing",
    "predictor port taken": "--http-port",
    "predictor gRPC port taken": "--grpc-port",
    "embedder port taken": "address already in use",
    "predictor without store": "--store (or MMRANK_STORE_URL) is required",
    "render invalid ranker": "invalid MultimodalRanker: spec.encoder: Field required",
    "render malformed YAML": "at line 2, column 1",
    "operator interval from env malformed": "'often' is not a duration",
    "operator without kubeconfig": "no Kubernetes credentials",
    "operator kubeconfig malformed": "no Kubernetes credentials",
    "operator apiserver unreachable": f"cannot reach the Kubernetes API at https://{CLOSED}",
    "fetch from a closed port": "error: cannot fetch http://127.0.0.1:1/model.pt",
}


def test_every_subcommand_turns_bad_input_into_one_line_on_stderr(files: dict[str, Path]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listening:
        cases = corpus(files, taken=listening.getsockname()[1])
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda case: mmrank(*case[1], env=case[2], stdin=""), cases))
    assert set(SAYS) <= {why for why, _, _ in cases}, "SAYS names a case the corpus lacks"
    failures = []
    for (why, argv, _), result in zip(cases, results, strict=False):
        lines = result.stderr.splitlines()
        named = lines[0].startswith(("mmrank", "error: cannot fetch")) if lines else False  # fetch: as before
        says = SAYS.get(why, "") in result.stderr
        if result.returncode == 0 or len(lines) != 1 or "Traceback" in result.stderr or not named or not says:
            failures.append(
                f"{why}: mmrank {' '.join(argv)} -> exit {result.returncode}, stderr {result.stderr[-600:]!r}"
            )
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
    commands = {
        tuple(argv[:2]) if argv[:1] in (["shop"], ["encoders"], ["ranker"]) else tuple(argv[:1]) for _, argv, _ in cases
    }
    assert len(commands) >= 20  # every subcommand the parser knows has cases


@pytest.mark.parametrize(
    ("which", "says"),
    [
        ("missing", "No such file"),
        ("dir", "Is a directory"),
        ("bad_yaml", "cannot read a YAML manifest"),
        ("binary", "not UTF-8 text"),
        ("empty", "no manifest in it"),
    ],
)
def test_validate_reports_a_file_it_cannot_read_in_its_report(files: dict[str, Path], which: str, says: str) -> None:
    """`validate` is a linter: its report on stdout is its answer, for a file it cannot read too
    (tests/test_api_models.py holds it to that); still exit 1 and never a traceback."""
    result = mmrank("validate", "-f", str(files[which]))
    assert result.returncode == 1 and result.stderr == "", result.stderr
    label, problem = result.stdout.splitlines()
    assert label == f"{files[which]}: invalid" and problem.startswith("  (file): ") and says in problem


def test_images_build_knows_the_dockerfiles_targets() -> None:
    from harness import cluster_cli, images

    assert tuple(images.TARGETS) == cluster_cli.TARGETS


@pytest.mark.parametrize("command", [["cluster", "status"], ["images", "build", "operator"]])
def test_the_local_node_commands_say_so_where_only_mmrank_is_installed(tmp_path: Path, command: list[str]) -> None:
    """An image holds mmrank but not harness/ (the checkout's local node and image builds): there
    `mmrank cluster` and `mmrank images` end in one line naming the missing part, no traceback.
    The interpreter sees only a copy of mmrank/ (-I -S: no checkout, no site-packages)."""
    (tmp_path / "mmrank").mkdir()
    for source in (ROOT / "mmrank").glob("*.py"):
        (tmp_path / "mmrank" / source.name).write_bytes(source.read_bytes())
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from mmrank.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, *command], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"mmrank {' '.join(command[:2])}: harness.cluster_cli is not installed here "
        "(this image or environment holds other parts of mmrank)\n"
    )


def test_argument_errors_exit_2_and_name_the_argument() -> None:
    result = mmrank("shop", "generate", "--size", "huge", "--out", "x")
    assert result.returncode == 2
    assert result.stderr.startswith("mmrank shop generate: error: argument --size: invalid choice: 'huge'")
    assert result.stderr.rstrip().endswith("(see mmrank shop generate --help)")


def test_version() -> None:
    result = mmrank("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"mmrank {cli.version()}" and re.fullmatch(
        r"mmrank \d+\.\d+\.\d+\S*\n", result.stdout
    )


def test_mmrank_debug_shows_the_traceback(tmp_path: Path) -> None:
    quiet = mmrank("render", "-f", str(tmp_path / "missing.yaml"))
    loud = mmrank("render", "-f", str(tmp_path / "missing.yaml"), env={cli.DEBUG_ENV: "1"})
    assert "Traceback" not in quiet.stderr and quiet.returncode == 1
    assert "Traceback" in loud.stderr and loud.returncode == 1


def test_describe_makes_one_line_of_any_error() -> None:
    missing = FileNotFoundError(2, "No such file or directory", "x.yaml")
    assert cli.describe(missing) == "x.yaml: No such file or directory"
    assert cli.describe(ValueError("two\n  lines")) == "two lines"
    assert cli.describe(KeyError("counts")) == "missing 'counts'"
    assert cli.describe(RuntimeError()) == "RuntimeError"
    assert cli.describe(TypeError("bad operand")) == "TypeError: bad operand"
    assert len(cli.describe(ValueError("x" * 5000))) == cli.MAX_MESSAGE
    try:
        yaml.safe_load("a: [b\n")
    except yaml.YAMLError as exc:
        assert re.fullmatch(r"expected ',' or '\]', but got '<stream end>' at line 2, column 1", cli.describe(exc))


# --- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("2m30s", 150),
        ("1h30m", 5400),
        ("1h", 3600),
        ("30", 30),
        ("0.05", 0.05),
        ("500ms", 0.5),
        ("1.5h", 5400),
        ("1h2m3s", 3723),
        ("0", 0),
    ],
)
def test_cli_durations_take_seconds_or_go_durations(text: str, seconds: float) -> None:
    assert cli.parse_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["soon", "1h30", "", "-5", "-1s", "nan", "inf", "1d", "h", "1.2.3s", "5 minutes"])
def test_cli_durations_refuse_what_is_not_one(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        cli.parse_seconds(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("1h30m", 5400),
        ("2m30s", 150),
        ("90m", 5400),
        ("1h5s", 3605),
        ("1h2m3s", 3723),
    ],
)
def test_rollout_interval_takes_go_durations(text: str, seconds: int) -> None:
    assert api.duration_seconds(text) == seconds
    manifest = yaml.safe_load(MINIMAL.read_text())
    manifest["spec"].setdefault("rollout", {})["interval"] = text
    assert api.problems(manifest) == []


@pytest.mark.parametrize("text", ["0s", "1h0m", "30", "1m1h", "1h30", "05s", "1.5h", "500ms", "1d", "", "soon"])
def test_rollout_interval_refuses_what_the_parser_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        api.duration_seconds(text)
    manifest = yaml.safe_load(MINIMAL.read_text())
    manifest["spec"].setdefault("rollout", {})["interval"] = text
    assert any(problem.startswith("spec.rollout.interval") for problem in api.problems(manifest))


def _crd_interval_pattern() -> str:
    crd = yaml.safe_load((ROOT / "crds" / "mmrank.io_multimodalrankers.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec["properties"]["rollout"]["properties"]["interval"]["pattern"]


def test_the_crd_pattern_is_the_parsers_expression() -> None:
    assert _crd_interval_pattern() == api.DURATION
    chart_crd = ROOT / "charts" / "mmrank-operator" / "crds" / "mmrank.io_multimodalrankers.yaml"
    if chart_crd.exists():  # the chart may ship its CRD elsewhere; wherever it is, it is the generated one
        assert chart_crd.read_text() == (ROOT / "crds" / "mmrank.io_multimodalrankers.yaml").read_text()


@given(st.text(alphabet="0123456789hms.u ", max_size=10))
def test_the_crd_pattern_accepts_exactly_what_the_parser_accepts(text: str) -> None:
    pattern = _PATTERN
    try:
        api.duration_seconds(text)
        parsed = True
    except ValueError:
        parsed = False
    assert bool(re.fullmatch(pattern, text)) == parsed


_PATTERN = _crd_interval_pattern()

INTERVALS = [
    "30s",
    "5m",
    "1h",
    "1h30m",
    "2m30s",
    "90m",
    "1h5s",
    "1h2m3s",
    "100000s",
    "0s",
    "1h0m",
    "30",
    "1m1h",
    "1h30",
    "05s",
    "1.5h",
    "500ms",
    "1d",
    "",
    "soon",
    " 5m",
    "5m ",
    "1H",
]


@pytest.mark.apiserver
def test_the_apiserver_admits_exactly_the_intervals_the_operator_reads(kube) -> None:  # type: ignore[no-untyped-def]
    """The pattern as Kubernetes runs it (Go's RE2), not only as Python does."""
    from kubernetes import client, dynamic
    from kubernetes.client.exceptions import ApiException

    from harness import servers

    servers.install_crds(kube.api_client, [api_crd.crd_manifest(cel=False)])
    namespace = f"cli-{os.getpid()}-{int.from_bytes(os.urandom(3), 'big')}"
    client.CoreV1Api(kube.api_client).create_namespace({"metadata": {"name": namespace}})
    rankers = dynamic.DynamicClient(kube.api_client).resources.get(api_version=api.API_VERSION, kind=api.KIND)
    disagreements, admitted_ones = [], []
    for interval in INTERVALS:
        body = yaml.safe_load(MINIMAL.read_text())
        body["spec"].setdefault("rollout", {})["interval"] = interval
        try:
            rankers.create(body=body, namespace=namespace, dry_run="All")
            admitted = True
            admitted_ones.append(interval)
        except ApiException as exc:
            assert exc.status == 422 and "spec.rollout.interval" in exc.body, exc.body
            admitted = False
        try:
            api.duration_seconds(interval)
            parsed = True
        except ValueError:
            parsed = False
        if admitted != parsed:
            disagreements.append(
                f"{interval!r}: apiserver {'admits' if admitted else 'refuses'}, "
                f"duration_seconds {'reads' if parsed else 'refuses'} it"
            )
    assert not disagreements, disagreements
    assert admitted_ones == INTERVALS[:9]  # the well-formed ones come first in the list


# --- progress -----------------------------------------------------------------------------------


def test_progress_on_a_terminal_and_none_in_logs(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "mmrank", "shop", "generate", "--size", "tiny"]
    logged = subprocess.run(
        [*argv, "--out", str(tmp_path / "logged")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert logged.returncode == 0, logged.stderr
    assert logged.stderr == "" and logged.stdout.startswith("shop tiny seed 0 ->")

    forced = subprocess.run(
        [*argv, "--out", str(tmp_path / "forced"), "--progress"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert forced.returncode == 0 and "100%" in forced.stderr, forced.stderr

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a fresh pty is 0 columns wide
    shown = subprocess.Popen(
        [*argv, "--out", str(tmp_path / "shown")], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=terminal
    )
    os.close(terminal)
    screen = b""
    while True:  # read as it comes, so the bar never blocks on a full terminal
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal's other end closed: all of it is read
            break
        if not chunk:
            break
        screen += chunk
    os.close(controller)
    assert shown.wait(timeout=120) == 0
    assert b"shop tiny" in screen and b"100%" in screen, screen[-400:]
    assert (
        json.loads((tmp_path / "shown" / "manifest.json").read_text())["counts"]
        == json.loads((tmp_path / "logged" / "manifest.json").read_text())["counts"]
    )
