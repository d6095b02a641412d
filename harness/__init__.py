"""What tests, benchmarks and the quick start run mmrank with; never shipped.

`servers` (real Triton, Redis, Prometheus, etcd and kube-apiserver on loopback ports), `cluster`
and `cluster_cli` (the local node: `mmrank cluster`), `images` (the Dockerfile's targets built with
buildah: `mmrank images`), `loadgen` (the bench and demo load rig) and `demo` (`./dev.sh demo`).
No wheel or image holds this package (pyproject lists only mmrank's), so editing a launcher never
changes what ships; it may import anything, and nothing under mmrank/ imports it.
"""
