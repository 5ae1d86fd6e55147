# Shared helpers for the test-bed scripts. Sourced, never executed.
#
# Every script runs as a sequence of named steps. A failing step prints one line naming the
# step and how to retry, then exits non-zero; nothing half-built is ever left where a later run
# would take it for finished (see `publish_dir`).

# errtrace: the ERR trap also fires for failures inside functions and subshells.
set -Eeuo pipefail

TESTBED_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$TESTBED_DIR/../.." && pwd)
# shellcheck source=../versions.env
. "$REPO_DIR/integration/versions.env"

STRAKE_CACHE=${STRAKE_CACHE:-/var/cache/strake}
# Upstream binaries, one directory per component and version, e.g.
# /var/cache/strake/kubernetes-v1.37.2/bin/kube-apiserver.
K8S_DIR="$STRAKE_CACHE/kubernetes-$KUBERNETES_VERSION"
ETCD_DIR="$STRAKE_CACHE/etcd-$ETCD_VERSION"
CRI_TOOLS_DIR="$STRAKE_CACHE/cri-tools-$CRI_TOOLS_VERSION"
CNI_DIR="$STRAKE_CACHE/cni-plugins-$CNI_PLUGINS_VERSION"
GVISOR_DIR="$STRAKE_CACHE/gvisor-$GVISOR_VERSION"
# Conformance bed (build-conformance.sh): e2e.test, ginkgo, agnhost, sample-apiserver; CoreDNS.
CONFORMANCE_DIR="$STRAKE_CACHE/conformance-$KUBERNETES_VERSION"
COREDNS_DIR="$STRAKE_CACHE/coredns-$COREDNS_VERSION"
# metrics-server and its manifests/base (build-conformance.sh).
METRICS_SERVER_DIR="$STRAKE_CACHE/metrics-server-$METRICS_SERVER_VERSION"
# The Go build and module caches of the bed's builds: ours, not the user's, so that
# prune-cache.sh can empty them once every binary is published (for the pinned set they reach
# about 11 GB and 3 GB, more than everything else `make test` keeps on disk).
export GOCACHE="$STRAKE_CACHE/go-build"
export GOMODCACHE="$STRAKE_CACHE/go-mod"

_step_name=""
_on_err() {
    local rc=$?
    # A failure in a subshell reaches the parent shell too: report it once, from the top.
    [ "$BASH_SUBSHELL" -eq 0 ] || exit "$rc"
    echo "testbed: step '${_step_name:-?}' failed (exit $rc); fix the cause above and run 'make testbed' again (finished steps are kept)" >&2
    exit "$rc"
}
trap _on_err ERR

# step NAME: announce the next step (progress for a person watching).
step() {
    _step_name=$1
    echo "==> [$(date +%H:%M:%S)] $1"
}

# publish_dir TMP FINAL: make a fully built directory visible under its final name in one
# rename, so that an interrupted build is never mistaken for a finished one.
publish_dir() {
    local tmp=$1 final=$2
    chmod 755 "$tmp"
    rm -rf "$final.old"
    [ -e "$final" ] && mv "$final" "$final.old"
    mv "$tmp" "$final"
    rm -rf "$final.old"
}
