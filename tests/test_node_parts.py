"""The local node's decisions, without a node: CIDR checks, the DNS hosts file, iptables cleanup,
component flags, image cache keys and the CLI's lazy parts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness import cluster, images
from mmrank import cli

ROOT = Path(__file__).resolve().parent.parent


def test_routes_that_overlap_the_cluster_cidrs_are_reported_and_others_ignored():
    routes = [
        "default via 192.0.2.1 dev eth0",
        "192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2",
        "10.244.0.0/24 dev mmrank0 proto kernel scope link src 10.244.0.1",
        "10.96.0.0/12 dev docker0",
        "10.0.0.0/8 via 192.0.2.1 dev eth0",
    ]
    assert cluster.route_collisions(routes) == ["10.96.0.0/12 dev docker0", "10.0.0.0/8 via 192.0.2.1 dev eth0"]
    assert cluster.route_collisions(routes[:3]) == []


def test_dns_hosts_names_every_service_with_a_cluster_ip():
    services = [
        {"metadata": {"name": "web", "namespace": "shop"}, "spec": {"clusterIP": "10.96.3.4"}},
        {"metadata": {"name": "headless", "namespace": "shop"}, "spec": {"clusterIP": "None"}},
        {"metadata": {"name": "kubernetes", "namespace": "default"}, "spec": {"clusterIP": "10.96.0.1"}},
        {"metadata": {"name": "pending", "namespace": "shop"}, "spec": {}},
    ]
    assert cluster.dns_hosts(services) == (
        "10.96.0.1 kubernetes.default.svc.cluster.local\n10.96.3.4 web.shop.svc.cluster.local\n"
    )


SAVED = """*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:CNI-abc - [0:0]
:DOCKER - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -s 10.244.0.5/32 -j CNI-abc
-A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE
-A KUBE-SERVICES -d 10.96.0.1/32 -j KUBE-SVC-X
COMMIT
*filter
:FORWARD ACCEPT [0:0]
:MMRANK-FORWARD - [0:0]
-A FORWARD -j MMRANK-FORWARD
-A FORWARD -j DOCKER
COMMIT
"""


def test_iptables_cleanup_removes_our_chains_and_the_jumps_to_them_only():
    commands = cluster.iptables_cleanup(SAVED)
    assert [
        "-t",
        "nat",
        "-D",
        "PREROUTING",
        "-m",
        "comment",
        "--comment",
        '"kubernetes',
        "service",
        'portals"',
        "-j",
        "KUBE-SERVICES",
    ] in commands
    assert ["-t", "nat", "-D", "POSTROUTING", "-s", "10.244.0.5/32", "-j", "CNI-abc"] in commands
    assert ["-t", "filter", "-D", "FORWARD", "-j", "MMRANK-FORWARD"] in commands
    assert ["-t", "nat", "-X", "KUBE-SERVICES"] in commands and ["-t", "filter", "-X", "MMRANK-FORWARD"] in commands
    assert not any("DOCKER" in c or "MASQUERADE" in c for c in commands)
    # Jumps go before the chains are flushed and deleted.
    first_delete = min(i for i, c in enumerate(commands) if c[2] == "-X")
    assert all(c[2] == "-D" for c in commands[:3]) and first_delete > 3


def test_the_kubelet_and_apiserver_listen_only_on_the_bridge_address():
    paths = cluster.Paths(run=Path("/x/run"), containerd_root=Path("/x/c"))
    kubelet = cluster.component_argv("kubelet", paths, pause_image="p:1")
    assert "--node-ip=10.244.0.1" in kubelet and "--address=10.244.0.1" in kubelet
    assert "--cluster-dns=10.244.0.1" in kubelet and "--pod-infra-container-image=p:1" in kubelet
    apiserver = cluster.component_argv("kube-apiserver", paths, etcd_url="http://127.0.0.1:1")
    assert "--bind-address=10.244.0.1" in apiserver and "--authorization-mode=Node,RBAC" in apiserver
    assert cluster.NETWORK.api_service_ip == "10.96.0.1"


def test_containerd_config_restricts_oom_score_adj_and_keeps_to_its_folders():
    paths = cluster.Paths(run=Path("/x/run"), containerd_root=Path("/x/c"))
    text = cluster.containerd_config(paths, "p:1")
    assert "restrict_oom_score_adj = true" in text
    assert 'root = "/x/c"' in text and 'state = "/x/run/containerd/state"' in text
    assert 'sandbox_image = "p:1"' in text


def test_pod_traffic_leaves_only_for_the_cluster():
    rules = cluster.forward_rules()
    assert rules[0][-1] == "ACCEPT" and rules[1] == ["-A", "MMRANK-FORWARD", "-s", "10.244.0.0/16", "-j", "DROP"]


def test_image_keys_change_with_content_and_nothing_else(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"junk")
    key = images.content_key(tmp_path, ["pkg"], ["runtime"])
    (tmp_path / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"other junk")
    assert images.content_key(tmp_path, ["pkg"], ["runtime"]) == key
    assert images.content_key(tmp_path, ["pkg"], ["operator"]) != key
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert images.content_key(tmp_path, ["pkg"], ["runtime"]) != key


def test_every_file_the_dockerfile_copies_is_an_input_of_its_target():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for target in images.TARGETS.values():
        for entry in target.inputs:
            assert (ROOT / entry).exists(), entry
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert any(
                    source == i or source.startswith(i + "/") for t in images.TARGETS.values() for i in t.inputs
                ), source


def test_no_image_reads_the_harness_so_editing_a_launcher_rebuilds_nothing():
    for target in images.TARGETS.values():
        read = images.input_files(ROOT, target.inputs)
        assert read and not [p for p in read if p.relative_to(ROOT).parts[0] == "harness"], target.name


def test_a_command_imports_only_the_part_that_owns_it():
    assert cli.parts_for(["operator", "run", "--standalone"]) == ["mmrank.operator.cli"]
    assert cli.parts_for(["--help"]) == [module for module, _ in cli.PARTS]
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from mmrank import cli; cli.build_parser(['operator', 'run']);"
            "print(sorted(m for m in sys.modules if m.startswith(('mmrank.encoders', 'mmrank.predictors', 'torch'))))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"


def test_replaced_builds_lose_their_image_id_references_and_current_ones_keep_them():
    listing = (
        "REF TYPE DIGEST SIZE PLATFORMS LABELS\n"
        "ghcr.io/mmrank/mmrank:0.1.0 application/vnd.oci.image.manifest.v1+json sha256:new 844 linux/amd64 x\n"
        "sha256:idnew application/vnd.oci.image.manifest.v1+json sha256:new 844 linux/amd64 x\n"
        "sha256:idold application/vnd.oci.image.manifest.v1+json sha256:old 840 linux/amd64 x\n"
    )
    assert cluster.replaced_image_refs(listing) == ["sha256:idold"]


def test_an_imported_archive_counts_as_loaded_only_while_its_name_points_at_its_build():
    """Another checkout's build of the same image name replaces ours in containerd: the record of
    our import must not make the node run theirs."""
    listing = (
        "REF TYPE DIGEST SIZE PLATFORMS LABELS\n"
        "ghcr.io/mmrank/mmrank-operator:0.1.0 application/vnd.oci.image.manifest.v1+json sha256:theirs 844 linux/amd64 x\n"
        "sha256:idours application/vnd.oci.image.manifest.v1+json sha256:ours 840 linux/amd64 x\n"
    )
    digests = cluster.image_digests(listing)
    assert digests == {"ghcr.io/mmrank/mmrank-operator:0.1.0": "sha256:theirs"}
    name = "ghcr.io/mmrank/mmrank-operator:0.1.0"
    assert cluster.still_loaded({"name": name, "digest": "sha256:theirs"}, digests) == name
    assert cluster.still_loaded({"name": name, "digest": "sha256:ours"}, digests) is None
    assert cluster.still_loaded(name, digests) is None  # a record from before digests
    assert cluster.still_loaded(None, digests) is None  # never imported
    assert cluster.still_loaded({"name": "other:1", "digest": "sha256:theirs"}, digests) is None


def test_an_import_is_retried_only_when_a_layer_snapshot_went_away_under_it():
    collected = (
        'ctr: failed to prepare extraction snapshot "extract-1 sha256:b0": parent snapshot '
        "sha256:cc does not exist: not found"
    )
    assert cluster.collected_under_import(collected)
    assert not cluster.collected_under_import("ctr: failed to open archive: no such file or directory")
    assert not cluster.collected_under_import("ctr: unexpected EOF")
