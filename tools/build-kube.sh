#!/usr/bin/env bash
# Builds Kubernetes 1.20 binaries from Debian bookworm's `kubernetes` source package and caches them.
# Usage: tools/build-kube.sh CACHE_DIR [BINARY...]
#   BINARY defaults to every one the project runs: kube-apiserver (tests of the operator) and
#   kubelet, kube-controller-manager, kube-scheduler, kube-proxy (the local node, harness.cluster).
#   Only the missing ones are built, all in one `make`, so the source is unpacked and compiled once.
#   Prints the cached binaries' paths on success.
#
# The vendored github.com/modern-go/reflect2 1.0.1 crashes under Go >= 1.18 ("fatal error: fault"
# in mapiterinit), so it is replaced by Debian's golang-github-modern-go-reflect2-dev (1.0.2).
set -euo pipefail
cache=${1:?cache dir}
shift
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(kube-apiserver kubelet kube-controller-manager kube-scheduler kube-proxy)

missing() {
  local out=()
  for b in "${wanted[@]}"; do [ -x "$cache/$b" ] || out+=("$b"); done
  echo "${out[@]:-}"
}
print_paths() { for b in "${wanted[@]}"; do echo "$cache/$b"; done; }

[ -z "$(missing)" ] && { print_paths; exit 0; }
mkdir -p "$cache"
# One build at a time: a second caller waits for the first and then finds the binaries.
exec 9>"$cache/.kube-build.lock"
flock 9
todo=$(missing)
[ -z "$todo" ] && { print_paths; exit 0; }
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

src_list=/etc/apt/sources.list.d/mmrank-deb-src.sources
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
  # A deb-src entry for the same Debian mirror the machine's sources already use.
  mirror=$(grep -rhoE 'https?://[^ ]*debian/?$|https?://[^ ]*/debian ' /etc/apt/sources.list.d/ /etc/apt/sources.list 2>/dev/null | head -1 | tr -d ' ' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  printf 'Types: deb-src\nURIs: %s\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror" > "$src_list"
  apt-get update -q >&2
fi
(cd "$work" && apt-get source -q --download-only kubernetes >&2 && dpkg-source -x kubernetes_*.dsc src >&2)
cd "$work/src"
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
sed -i 's#github.com/modern-go/reflect2 v1.0.1#github.com/modern-go/reflect2 v1.0.2#g' go.mod vendor/modules.txt
export PATH=/usr/lib/go-1.19/bin:$PATH GOPROXY=off CGO_ENABLED=0 GOFLAGS=-mod=vendor GOCACHE="$work/gocache"
what=""
for b in $todo; do what="$what cmd/$b"; done
nice -n 10 make WHAT="${what# }" >&2
for b in $todo; do
  built=_output/bin/$b
  [ -x "$built" ] || built=_output/local/bin/linux/amd64/$b
  install -m 0755 "$built" "$cache/$b.tmp"
  mv "$cache/$b.tmp" "$cache/$b"
done
print_paths
