#!/usr/bin/env bash
# Builds the local Kubernetes control plane that tests/controlplane runs: kube-apiserver and
# kube-controller-manager v1.20.2 from Debian bookworm's `kubernetes` source package (all Go
# dependencies vendored, so the build is offline), and etcd 3.4 taken from Debian's
# `etcd-server` package (extracted, not installed: no system service gets enabled).
#
# Output, outside the checkout:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/bazaar/kubernetes-1.20.2/
#     bin/kube-apiserver  bin/kube-controller-manager  bin/etcd
#     VERSIONS            what was built, from which Debian packages
#     .complete           written last; without it the next run starts over
#
# Idempotent: exits 0 at once when the cache is complete. Needs root (or password-less sudo)
# only when apt packages are missing: golang-1.19-go, rsync, dpkg-dev, make, and a deb-src
# line for bookworm (added as /etc/apt/sources.list.d/bazaar-deb-src.sources). Runs without a
# terminal (CI=true, no stdin). A cold build costs about 15 CPU-minutes (code generation ~2,
# the two binaries ~12, with GOMAXPROCS=nproc). Measured on 2 cores: 7m45s on a quiet machine
# (plus ~25 s of apt on a fresh one), 23 minutes on one that other jobs kept busy. Disk: ~2.5 GB
# while building (source, Go build cache), ~240 MB afterwards.
set -euo pipefail

K8S_VERSION=1.20.2
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/bazaar/kubernetes-${K8S_VERSION}"
BIN="$CACHE/bin"
BUILD="$CACHE/build"
MARKER="$CACHE/.complete"
BINARIES=(kube-apiserver kube-controller-manager etcd)
APT_PACKAGES=(golang-1.19-go rsync dpkg-dev make)
GOROOT_BIN=/usr/lib/go-1.19/bin

started=$SECONDS
say() { printf 'build.sh: %s\n' "$*"; }
elapsed() { printf '%dm%02ds' $(((SECONDS - started) / 60)) $(((SECONDS - started) % 60)); }

cache_complete() {
    [[ -f $MARKER ]] || return 1
    local b
    for b in "${BINARIES[@]}"; do
        [[ -x $BIN/$b ]] || return 1
    done
}

if cache_complete; then
    say "control plane binaries are cached in $BIN"
    exit 0
fi

mkdir -p "$CACHE"
# One build at a time: a second caller waits for the first, then finds the cache complete.
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    say "another build.sh is running; waiting for it"
    flock 9
fi
if cache_complete; then
    say "control plane binaries are cached in $BIN"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    SUDO=(sudo -n)
fi

installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]; }
have_deb_src() { [[ -n $(apt-cache showsrc kubernetes 2>/dev/null) ]]; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done
if ((${#missing[@]})) || ! have_deb_src; then
    if ! have_deb_src; then
        say "adding a deb-src entry for bookworm (/etc/apt/sources.list.d/bazaar-deb-src.sources)"
        "${SUDO[@]}" tee /etc/apt/sources.list.d/bazaar-deb-src.sources >/dev/null <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    say "apt-get update"
    "${SUDO[@]}" apt-get update -q </dev/null
    if ((${#missing[@]})); then
        say "installing ${missing[*]}"
        "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
    fi
    have_deb_src || { say "apt-cache has no source for kubernetes after apt-get update"; exit 1; }
fi

# Start over: whatever an interrupted run left behind is discarded.
rm -rf "$BUILD" "$BIN" "$MARKER" "$CACHE/VERSIONS"
mkdir -p "$BUILD/src/k8s.io" "$BUILD/download" "$BIN"

say "downloading the kubernetes source package and etcd-server ($(elapsed))"
(
    cd "$BUILD/download"
    # As root apt warns that the download is unsandboxed (user _apt cannot write here); harmless.
    apt-get source -q kubernetes </dev/null 2>&1 | grep -v '^W: Download is performed unsandboxed' || true
    apt-get download -q etcd-server </dev/null 2>&1 | grep -v '^W: Download is performed unsandboxed' || true
)
src=$(find "$BUILD/download" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
[[ -n $src && -f $src/hack/lib/version.sh ]] || { say "apt-get source kubernetes produced no source tree"; exit 1; }
grep -q "tag: v${K8S_VERSION}'" "$src/hack/lib/version.sh" ||
    { say "the Debian source is not Kubernetes v${K8S_VERSION} (see $src/hack/lib/version.sh)"; exit 1; }
etcd_deb=$(find "$BUILD/download" -maxdepth 1 -name 'etcd-server_*.deb' | head -n1)
[[ -n $etcd_deb ]] || { say "apt-get download etcd-server produced no .deb"; exit 1; }
debian_version=$(basename "$src")
mv "$src" "$BUILD/src/k8s.io/kubernetes"
KROOT="$BUILD/src/k8s.io/kubernetes"

say "extracting etcd from $(basename "$etcd_deb")"
dpkg-deb -x "$etcd_deb" "$BUILD/etcd-server"
install -m 0755 "$BUILD/etcd-server/usr/bin/etcd" "$BIN/etcd"

export PATH="$GOROOT_BIN:$PATH"
export GOPATH="$BUILD"
export GOCACHE="$BUILD/gocache"
export GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=0
export GOMAXPROCS="${GOMAXPROCS:-$(nproc)}"
# The source is a Debian tarball, not a git tree: version.sh reads v1.20.2 from the archive.
export KUBE_BUILD_PLATFORMS=linux/amd64 KUBE_VERBOSE=1
say "using $(go version), GOMAXPROCS=$GOMAXPROCS"

cd "$KROOT"
say "generating code: openapi, deepcopy, conversion (about 2 CPU-minutes) ($(elapsed))"
make generated_files </dev/null
say "building kube-apiserver and kube-controller-manager (about 12 CPU-minutes: 6 minutes on 2 idle cores) ($(elapsed))"
hack/make-rules/build.sh cmd/kube-apiserver cmd/kube-controller-manager </dev/null

for b in kube-apiserver kube-controller-manager; do
    install -m 0755 "$KROOT/_output/local/bin/linux/amd64/$b" "$BIN/$b"
done
for b in "${BINARIES[@]}"; do
    "$BIN/$b" --version >/dev/null || { say "$BIN/$b --version failed"; exit 1; }
done

{
    echo "kube-apiserver: $("$BIN/kube-apiserver" --version)"
    echo "kube-controller-manager: $("$BIN/kube-controller-manager" --version)"
    echo "etcd: $("$BIN/etcd" --version | head -n1)"
    echo "from Debian source package: $debian_version"
    echo "etcd from: $(basename "$etcd_deb")"
    echo "go: $(go version)"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$CACHE/VERSIONS"

say "removing the build tree ($(du -sh "$BUILD" | cut -f1))"
chmod -R u+w "$BUILD" 2>/dev/null || true
rm -rf "$BUILD"
touch "$MARKER"
say "done in $(elapsed): $(tr '\n' ';' <"$CACHE/VERSIONS")"
