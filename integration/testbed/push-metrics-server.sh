#!/usr/bin/env bash
# Pushes the metrics-server image the tests deploy (`kubectl top`): the cached static binary
# (build-conformance.sh) alone, as upstream's image holds it, entrypoint /metrics-server.
#
#   integration/testbed/push-metrics-server.sh REGISTRY
#   pushes REGISTRY/metrics-server/metrics-server:$METRICS_SERVER_VERSION (plain HTTP)
#
# Made with umoci (rootless unpack/repack: every entry owned by root), pushed with skopeo.
. "$(dirname "$0")/lib.sh"
umask 022

[ $# -eq 1 ] || { echo "usage: $0 REGISTRY" >&2; exit 2; }
REGISTRY=$1
BIN="$METRICS_SERVER_DIR/bin/metrics-server"
[ -x "$BIN" ] || { echo "$BIN is missing: run make conformance-bed" >&2; exit 1; }
TAG=$METRICS_SERVER_VERSION
case $(uname -m) in
    x86_64) ARCH=amd64 ;;
    aarch64 | arm64) ARCH=arm64 ;;
    *) echo "unsupported machine $(uname -m)" >&2; exit 1 ;;
esac
DEST="docker://$REGISTRY/metrics-server/metrics-server:$TAG"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/metrics-server-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
L="$WORK/layout"
umoci init --layout "$L"
umoci new --image "$L:$TAG"
umoci unpack --rootless --image "$L:$TAG" "$WORK/bundle" >/dev/null
install -m 755 "$BIN" "$WORK/bundle/rootfs/metrics-server"
mkdir -p "$WORK/bundle/rootfs/tmp"
chmod 1777 "$WORK/bundle/rootfs/tmp"
umoci repack --image "$L:$TAG" --history.created_by "push-metrics-server.sh $TAG" "$WORK/bundle"
umoci config --image "$L:$TAG" --no-history --os linux --architecture "$ARCH" \
    --config.entrypoint /metrics-server
printf '{"default":[{"type":"insecureAcceptAnything"}]}\n' >"$WORK/policy.json"
printf '{}\n' >"$WORK/auth.json"
skopeo --policy "$WORK/policy.json" copy -q --dest-tls-verify=false \
    --dest-authfile "$WORK/auth.json" "oci:$L:$TAG" "$DEST"
echo "pushed $REGISTRY/metrics-server/metrics-server:$TAG"
