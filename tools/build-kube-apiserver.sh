#!/usr/bin/env bash
# Builds kube-apiserver, and with it the node's binaries from the same unpacked source (one
# compile instead of two): see tools/build-kube.sh. Prints kube-apiserver's path on success.
# Usage: tools/build-kube-apiserver.sh CACHE_DIR
set -euo pipefail
cache=${1:?cache dir}
"$(dirname "$0")/build-kube.sh" "$cache" >/dev/null
echo "$cache/kube-apiserver"
