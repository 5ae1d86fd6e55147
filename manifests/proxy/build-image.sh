#!/usr/bin/env bash
# Builds the strake-proxy container image locally and pushes it to a registry:
#
#   manifests/proxy/build-image.sh REGISTRY [TAG]
#     REGISTRY   host:port of the registry, e.g. 127.0.0.1:5000
#     TAG        image tag (default: the workspace version, as daemonset.yaml names it)
#   pushes     REGISTRY/strake/strake-proxy:TAG
#
# Environment:
#   STRAKE_PROXY_BIN   use this binary instead of building `cargo build --release -p strake-proxy`
#   DEST_TLS_VERIFY    skopeo's --dest-tls-verify (default false: a loopback or test registry)
#   OCI_LAYOUT         also keep the OCI layout here (default: a temporary directory)
#
# The release binary is linked against glibc, and the proxy runs two programs, `nft` and
# `conntrack`: the image holds the three binaries and exactly the shared libraries `ldd` names
# for them (with the dynamic loader), taken from this machine. Nothing is downloaded. The image
# is made with umoci (rootless unpack/repack: every entry owned by root) and pushed with skopeo.
set -Eeuo pipefail
umask 022
export LC_ALL=C

die() { echo "build-image.sh: $*" >&2; exit 1; }

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $0 REGISTRY [TAG]"
REGISTRY=$1
REPO_DIR=$(cd "$(dirname "$0")/../.." && pwd)
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$REPO_DIR/Cargo.toml")
[ -n "$VERSION" ] || die "cannot read the workspace version from $REPO_DIR/Cargo.toml"
TAG=${2:-$VERSION}
IMAGE=strake/strake-proxy
DEST="docker://$REGISTRY/$IMAGE:$TAG"

for t in umoci skopeo ldd jq sha256sum; do
    command -v "$t" >/dev/null || die "$t is not on PATH"
done
NFT=$(command -v nft || true)
CONNTRACK=$(command -v conntrack || true)
[ -n "$NFT" ] && [ -n "$CONNTRACK" ] || die "nft and conntrack must be installed (nftables, conntrack)"

case $(uname -m) in
    x86_64) ARCH=amd64 ;;
    aarch64 | arm64) ARCH=arm64 ;;
    *) die "unsupported machine $(uname -m)" ;;
esac

if [ -n "${STRAKE_PROXY_BIN:-}" ]; then
    BIN=$STRAKE_PROXY_BIN
else
    echo "==> cargo build --release -p strake-proxy"
    (cd "$REPO_DIR" && cargo build --release --locked -p strake-proxy)
    BIN="$REPO_DIR/target/release/strake-proxy"
fi
[ -x "$BIN" ] || die "$BIN is not an executable"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/strake-proxy-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
L=${OCI_LAYOUT:-$WORK/layout}
ROOT="$WORK/rootfs"

echo "==> rootfs: strake-proxy, nft, conntrack and their libraries"
mkdir -p "$ROOT"/{etc,tmp,usr/local/bin,usr/sbin,var/lib/strake/proxy,run}
chmod 1777 "$ROOT/tmp"
install -m 755 "$BIN" "$ROOT/usr/local/bin/strake-proxy"
install -m 755 "$NFT" "$ROOT/usr/sbin/nft"
install -m 755 "$CONNTRACK" "$ROOT/usr/sbin/conntrack"
# copy_libs BINARY: every library ldd resolves for BINARY, and the loader, at the same path.
copy_libs() {
    local lib
    ldd "$1" | awk '/=> \// { print $3 } /^\t\// { print $1 }' | while read -r lib; do
        [ -e "$ROOT$lib" ] && continue
        mkdir -p "$ROOT$(dirname "$lib")"
        cp -L "$lib" "$ROOT$lib"
        chmod 755 "$ROOT$lib"
    done
}
for b in "$BIN" "$NFT" "$CONNTRACK"; do copy_libs "$b"; done
printf '%s\n' 'root:x:0:0:root:/:/usr/sbin/nologin' 'nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin' \
    >"$ROOT/etc/passwd"
printf '%s\n' 'root:x:0:' 'nobody:x:65534:' >"$ROOT/etc/group"
# The image must be complete: run each program inside it (as root, where chroot is allowed).
if [ "$(id -u)" = 0 ]; then
    chroot "$ROOT" /usr/local/bin/strake-proxy --version
    chroot "$ROOT" /usr/sbin/nft --version
    chroot "$ROOT" /usr/sbin/conntrack --version
fi

echo "==> OCI image $IMAGE:$TAG ($ARCH)"
umoci init --layout "$L"
umoci new --image "$L:$TAG"
B="$WORK/bundle"
umoci unpack --rootless --image "$L:$TAG" "$B" >/dev/null
cp -a "$ROOT/." "$B/rootfs/"
umoci repack --image "$L:$TAG" --history.created_by "build-image.sh: strake-proxy $VERSION" "$B"
umoci config --image "$L:$TAG" --no-history --os linux --architecture "$ARCH" \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.entrypoint /usr/local/bin/strake-proxy \
    --config.label "org.opencontainers.image.title=strake-proxy" \
    --config.label "org.opencontainers.image.version=$VERSION"

echo "==> push $DEST"
printf '{"default":[{"type":"insecureAcceptAnything"}]}\n' >"$WORK/policy.json"
printf '{}\n' >"$WORK/auth.json"
skopeo --policy "$WORK/policy.json" copy -q --preserve-digests \
    --dest-tls-verify="${DEST_TLS_VERIFY:-false}" --dest-authfile "${REGISTRY_AUTH_FILE:-$WORK/auth.json}" \
    "oci:$L:$TAG" "$DEST"
DIGEST=$(skopeo --policy "$WORK/policy.json" inspect --raw --tls-verify="${DEST_TLS_VERIFY:-false}" \
    --authfile "${REGISTRY_AUTH_FILE:-$WORK/auth.json}" "$DEST" | sha256sum | cut -d' ' -f1)
echo "pushed $REGISTRY/$IMAGE:$TAG@sha256:$DIGEST"
