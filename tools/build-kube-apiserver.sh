#!/usr/bin/env bash
# Builds kube-apiserver from Debian bookworm's `kubernetes` source package and caches the binary.
# Usage: tools/build-kube-apiserver.sh CACHE_DIR   (prints the binary's path on success)
#
# The vendored github.com/modern-go/reflect2 1.0.1 crashes under Go >= 1.18 ("fatal error: fault"
# in mapiterinit), so it is replaced by Debian's golang-github-modern-go-reflect2-dev (1.0.2).
set -euo pipefail
cache=${1:?cache dir}
bin="$cache/kube-apiserver"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
mkdir -p "$cache"
# One build at a time: a second caller waits for the first and then finds the binary.
exec 9>"$cache/.kube-apiserver.lock"
flock 9
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
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
make WHAT=cmd/kube-apiserver >&2
install -m 0755 _output/bin/kube-apiserver "$bin.tmp" 2>/dev/null || install -m 0755 _output/local/bin/linux/amd64/kube-apiserver "$bin.tmp"
mv "$bin.tmp" "$bin"
echo "$bin"
