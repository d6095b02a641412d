"""The real Triton server from the nvidia-pytriton wheel serves a tiny torch model."""

from __future__ import annotations

import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.triton

MODEL_PY = textwrap.dedent("""
    import json
    import os

    import numpy as np
    import torch
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def initialize(self, args):
            here = os.path.dirname(__file__)
            self.model = torch.jit.load(os.path.join(here, "model.pt"))

        def execute(self, requests):
            responses = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
                with torch.no_grad():
                    y = self.model(torch.from_numpy(x)).numpy().astype(np.float32)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", y)]))
            return responses
""")

CONFIG = textwrap.dedent("""
    name: "tiny"
    backend: "python"
    max_batch_size: 8
    input [ { name: "X", data_type: TYPE_FP32, dims: [ 4 ] } ]
    output [ { name: "Y", data_type: TYPE_FP32, dims: [ 2 ] } ]
    instance_group [ { kind: KIND_CPU, count: 1 } ]
    dynamic_batching { max_queue_delay_microseconds: 1000 }
""")


def tiny_repository(root: Path) -> tuple[Path, torch.jit.ScriptModule]:
    torch.manual_seed(0)
    module = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)))
    version = root / "tiny" / "1"
    version.mkdir(parents=True)
    (root / "tiny" / "config.pbtxt").write_text(CONFIG)
    (version / "model.py").write_text(MODEL_PY)
    module.save(str(version / "model.pt"))
    return root, module


def test_triton_answers_http_and_grpc_with_torch_numbers_and_counts_requests(tmp_path, start_triton):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    repo, module = tiny_repository(tmp_path / "repo")
    server = start_triton(repo)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    expected = module(torch.from_numpy(x)).detach().numpy()

    http = httpclient.InferenceServerClient(server.url)
    inp = httpclient.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    got_http = http.infer("tiny", [inp]).as_numpy("Y")

    grpc = grpcclient.InferenceServerClient(server.extra["grpc_url"])
    ginp = grpcclient.InferInput("X", list(x.shape), "FP32")
    ginp.set_data_from_numpy(x)
    got_grpc = grpc.infer("tiny", [ginp]).as_numpy("Y")

    np.testing.assert_allclose(got_http, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_grpc, expected, rtol=1e-5, atol=1e-6)

    with urllib.request.urlopen(server.extra["metrics_url"], timeout=5) as response:
        metrics = response.read().decode()
    success = [
        line
        for line in metrics.splitlines()
        if line.startswith("nv_inference_request_success{") and 'model="tiny"' in line
    ]
    assert success, metrics[:2000]
    assert float(success[0].rsplit(" ", 1)[1]) == 2.0


def test_triton_fixture_names_the_missing_stub(tmp_path, monkeypatch):
    from harness import servers

    monkeypatch.setattr(servers, "CACHE", tmp_path / "empty-cache")
    with pytest.raises(servers.ServerUnavailable, match="stub"):
        servers.start_triton(tmp_path)


def test_killing_triton_leaves_no_python_backend_stub_behind(tmp_path):
    import os
    import time

    from harness import servers

    repo, _ = tiny_repository(tmp_path / "repo")
    server = servers.start_triton(repo, tmp_path / "triton")
    try:
        group = server.process.pid
        members = [p for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == group]
        assert len(members) >= 2, "expected tritonserver and its Python-backend stub in one process group"
        server.kill()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(group):
            time.sleep(0.1)
        assert not _group_alive(group), "a process of the killed Triton is still running"
    finally:
        server.stop()


def _pgid(pid: int) -> int | None:
    import os

    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _group_alive(group: int) -> bool:
    import os

    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
