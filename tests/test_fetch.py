"""`mmrank fetch`, the init container of every pod that needs an artifact: KServe's storage code
for remote URIs (here a real HTTP server on loopback), a copy for a mounted claim."""

from __future__ import annotations

import contextlib
import functools
import http.server
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def fetch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmrank", "fetch", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    repo = tmp_path / "repo" / "item_encoder" / "1"
    repo.mkdir(parents=True)
    (repo / "model.py").write_text("# a model\n")
    (tmp_path / "repo" / "item_encoder" / "tokenizer.json").write_text("{}")
    return tmp_path / "repo"


def test_a_mounted_claim_is_copied_so_the_destination_stays_writable(repository: Path, tmp_path: Path) -> None:
    dest = tmp_path / "models"
    result = fetch(str(repository), str(dest))
    assert result.returncode == 0, result.stderr
    copied = dest / "item_encoder" / "1" / "model.py"
    assert copied.read_text() == "# a model\n" and not copied.is_symlink()
    assert "fetched" in result.stdout and "2 files" in result.stdout
    (dest / "item_encoder" / "config.pbtxt").write_text("name: 'item_encoder'\n")  # as install-config does


def test_an_http_archive_is_fetched_and_unpacked_by_kserve_storage(repository: Path, tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "e1.tar.gz", "w:gz") as archive:
        archive.add(repository / "item_encoder", arcname="item_encoder")
    dest = tmp_path / "models"
    with http_server(served) as url:
        result = fetch(f"{url}/e1.tar.gz", str(dest))
    assert result.returncode == 0, result.stderr
    assert (dest / "item_encoder" / "1" / "model.py").read_text() == "# a model\n"


def test_what_cannot_be_fetched_is_one_line_and_a_failing_exit(tmp_path: Path) -> None:
    missing = fetch(str(tmp_path / "no-such-claim" / "e1"), str(tmp_path / "out"))
    assert missing.returncode == 1 and "does not exist (is the volume mounted?)" in missing.stderr
    assert "Traceback" not in missing.stderr
    with http_server(tmp_path) as url:
        absent = fetch(f"{url}/nothing.tar.gz", str(tmp_path / "out2"))
    assert (
        absent.returncode == 1 and absent.stderr.startswith("error: cannot fetch") and "Traceback" not in absent.stderr
    )
