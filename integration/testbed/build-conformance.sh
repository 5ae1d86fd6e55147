#!/usr/bin/env bash
# Builds upstream's conformance test binaries from Go modules at the versions pinned in
# integration/versions.env, into the cache outside the repository, one file at a time:
#
#   $STRAKE_CACHE/conformance-$KUBERNETES_VERSION/bin/
#     e2e.test          go test -c k8s.io/kubernetes/test/e2e
#     ginkgo            github.com/onsi/ginkgo/v2/ginkgo at the version k8s.io/kubernetes requires
#     agnhost           k8s.io/kubernetes/test/images/agnhost
#     sample-apiserver  k8s.io/sample-apiserver at v0.<minor>.<patch>
#     nnp               k8s.io/kubernetes/test/images/nonewprivs (the nonewprivs image's program)
#   $STRAKE_CACHE/conformance-$KUBERNETES_VERSION/coredns.yaml.base   upstream's CoreDNS addon
#   $STRAKE_CACHE/coredns-$COREDNS_VERSION/bin/coredns
#   $STRAKE_CACHE/metrics-server-$METRICS_SERVER_VERSION/bin/metrics-server, and manifests/
#     (the module's manifests/base: what `kubectl apply -k` deploys)
#
# Each binary is linked to a temporary name and renamed into place when complete, so an
# interrupted build is never taken for a finished one; a present binary is not rebuilt. The
# slow one (e2e.test: tens of minutes on two cores) is built last. Build times and sizes are
# printed. Nothing but the Go module proxy is needed.
. "$(dirname "$0")/lib.sh"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOPROXY=${GOPROXY:-https://proxy.golang.org}
command -v go >/dev/null || { step "find go"; echo "go is not on PATH" >&2; false; }
mkdir -p "$STRAKE_CACHE"
CONF_BIN="$CONFORMANCE_DIR/bin"
COREDNS_BIN="$COREDNS_DIR/bin"
mkdir -p "$CONF_BIN" "$COREDNS_BIN"

MINOR=${KUBERNETES_VERSION#v1.}
MINOR=${MINOR%%.*}
STAGING_VERSION=v0.${KUBERNETES_VERSION#v1.}
# The same staging replacements as build-upstream.sh: k8s.io/kubernetes' own go.mod points them
# at ./staging, which a module outside its tree cannot use.
STAGING=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
    cloud-provider cluster-bootstrap code-generator component-base component-helpers
    controller-manager cri-api cri-client cri-streaming csi-translation-lib
    dynamic-resource-allocation endpointslice externaljwt kms kube-aggregator
    kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics mount-utils
    pod-security-admission sample-apiserver streaming)
SRC="$STRAKE_CACHE/.conformance-src-$KUBERNETES_VERSION"

# The throw-away module requiring k8s.io/kubernetes (and the staging modules) at the pin.
kubernetes_module() {
    mkdir -p "$SRC"
    [ -e "$SRC/go.mod" ] && return
    {
        echo "module strake.invalid/conformance"
        echo "go 1.26"
        echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
        echo "require k8s.io/sample-apiserver $STAGING_VERSION"
        for s in "${STAGING[@]}"; do echo "replace k8s.io/$s => k8s.io/$s $STAGING_VERSION"; done
    } >"$SRC/go.mod.tmp"
    mv "$SRC/go.mod.tmp" "$SRC/go.mod"
}

# The k8s.io/kubernetes module's source in the module cache (for pinned versions and pause.c).
kubernetes_source() {
    kubernetes_module
    (cd "$SRC" && GOFLAGS=-mod=mod go mod download -json k8s.io/kubernetes | jq -r .Dir)
}

# report NAME FILE SECONDS: one line with the build time and the size.
report() {
    printf '    built %s in %d s, %s\n' "$1" "$3" "$(du -h "$2" | cut -f1)"
}

# publish_file TMP FINAL: rename a fully linked binary into place.
publish_file() {
    chmod 755 "$1"
    mv -f "$1" "$2"
}

version_ldflags() {
    local v=k8s.io/component-base/version cv=k8s.io/client-go/pkg/version ld="-s -w" p
    for p in $v $cv; do
        ld+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$MINOR"
        ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
    done
    echo "$ld"
}

# build_in_module NAME PACKAGE [extra ldflags]: go build PACKAGE in the throw-away module.
build_in_module() {
    local name=$1 pkg=$2 extra=${3:-} final="$CONF_BIN/$1" t0
    [ -x "$final" ] && { echo "    cached: $final"; return; }
    kubernetes_module
    t0=$(date +%s)
    (cd "$SRC" && GOFLAGS=-mod=mod go build -trimpath -ldflags "$(version_ldflags) $extra" \
        -o "$final.tmp" "$pkg")
    publish_file "$final.tmp" "$final"
    report "$name" "$final" $(($(date +%s) - t0))
}

build_ginkgo() {
    local final="$CONF_BIN/ginkgo" dir v t0
    [ -x "$final" ] && { echo "    cached: $final"; return; }
    dir=$(kubernetes_source)
    # The version k8s.io/kubernetes requires: the one its e2e.test is linked with.
    v=$(awk '$1 == "github.com/onsi/ginkgo/v2" { print $2; exit }' "$dir/go.mod")
    [ -n "$v" ] || { echo "no github.com/onsi/ginkgo/v2 in $dir/go.mod" >&2; false; }
    t0=$(date +%s)
    local gobin
    gobin=$(mktemp -d "$STRAKE_CACHE/.ginkgo.XXXXXX")
    GOFLAGS= GOBIN="$gobin" go install -trimpath -ldflags "-s -w" "github.com/onsi/ginkgo/v2/ginkgo@$v"
    publish_file "$gobin/ginkgo" "$final"
    rm -rf "$gobin"
    report "ginkgo $v" "$final" $(($(date +%s) - t0))
}

build_coredns() {
    local final="$COREDNS_BIN/coredns" dir shipped t0 gobin
    [ -x "$final" ] && { echo "    cached: $final"; return; }
    dir=$(kubernetes_source)
    # The pin must be the version the pinned Kubernetes ships as its cluster DNS.
    shipped=$(sed -n 's|.*image: registry.k8s.io/coredns/coredns:\(v[0-9.]*\).*|\1|p' \
        "$dir/cluster/addons/dns/coredns/coredns.yaml.base" | head -1)
    if [ "$shipped" != "$COREDNS_VERSION" ]; then
        echo "versions.env pins CoreDNS $COREDNS_VERSION, Kubernetes $KUBERNETES_VERSION ships $shipped" >&2
        false
    fi
    t0=$(date +%s)
    gobin=$(mktemp -d "$STRAKE_CACHE/.coredns.XXXXXX")
    GOFLAGS= GOBIN="$gobin" go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
    publish_file "$gobin/coredns" "$final"
    rm -rf "$gobin"
    report "coredns $COREDNS_VERSION" "$final" $(($(date +%s) - t0))
}

# metrics-server is a program of its module: go get -tool in a throw-away module, then build.
build_metrics_server() {
    local final="$METRICS_SERVER_DIR/bin/metrics-server" src t0 dir
    mkdir -p "$METRICS_SERVER_DIR/bin"
    if [ -x "$final" ] && [ -f "$METRICS_SERVER_DIR/manifests/kustomization.yaml" ]; then
        echo "    cached: $final"
        return
    fi
    t0=$(date +%s)
    src=$(mktemp -d "$STRAKE_CACHE/.metrics-server.XXXXXX")
    printf 'module strake.invalid/metricsserver\ngo 1.26\n' >"$src/go.mod"
    (cd "$src" && GOFLAGS= go get -tool "sigs.k8s.io/metrics-server/cmd/metrics-server@$METRICS_SERVER_VERSION" &&
        GOFLAGS= go build -trimpath -ldflags "-s -w" -o "$final.tmp" sigs.k8s.io/metrics-server/cmd/metrics-server)
    dir=$(cd "$src" && GOFLAGS= go mod download -json "sigs.k8s.io/metrics-server@$METRICS_SERVER_VERSION" | jq -r .Dir)
    rm -rf "$METRICS_SERVER_DIR/manifests.tmp"
    cp -r "$dir/manifests/base" "$METRICS_SERVER_DIR/manifests.tmp"
    chmod -R u+w "$METRICS_SERVER_DIR/manifests.tmp"
    rm -rf "$METRICS_SERVER_DIR/manifests"
    mv "$METRICS_SERVER_DIR/manifests.tmp" "$METRICS_SERVER_DIR/manifests"
    publish_file "$final.tmp" "$final"
    rm -rf "$src"
    report "metrics-server $METRICS_SERVER_VERSION" "$final" $(($(date +%s) - t0))
}

build_e2e() {
    local final="$CONF_BIN/e2e.test" t0
    [ -x "$final" ] && { echo "    cached: $final"; return; }
    kubernetes_module
    t0=$(date +%s)
    (cd "$SRC" && GOFLAGS=-mod=mod go test -c -trimpath -ldflags "$(version_ldflags)" \
        -o "$final.tmp" k8s.io/kubernetes/test/e2e)
    publish_file "$final.tmp" "$final"
    report e2e.test "$final" $(($(date +%s) - t0))
}

step "build ginkgo (the version k8s.io/kubernetes $KUBERNETES_VERSION requires)"
build_ginkgo
step "build agnhost ($KUBERNETES_VERSION test/images/agnhost)"
build_in_module agnhost k8s.io/kubernetes/test/images/agnhost \
    "-X main.Version=$(cat "$(kubernetes_source)/test/images/agnhost/VERSION")"
step "build nnp ($KUBERNETES_VERSION test/images/nonewprivs)"
build_in_module nnp k8s.io/kubernetes/test/images/nonewprivs
step "build sample-apiserver $STAGING_VERSION"
build_in_module sample-apiserver k8s.io/sample-apiserver
step "build CoreDNS $COREDNS_VERSION"
build_coredns
step "copy the CoreDNS addon manifest of $KUBERNETES_VERSION"
# strake-testbed cluster deploys the cluster DNS as upstream's addon manifest does.
if [ ! -f "$CONFORMANCE_DIR/coredns.yaml.base" ]; then
    install -m 644 "$(kubernetes_source)/cluster/addons/dns/coredns/coredns.yaml.base" "$CONFORMANCE_DIR/coredns.yaml.base.tmp"
    mv "$CONFORMANCE_DIR/coredns.yaml.base.tmp" "$CONFORMANCE_DIR/coredns.yaml.base"
fi
echo "    $CONFORMANCE_DIR/coredns.yaml.base"
step "build metrics-server $METRICS_SERVER_VERSION"
build_metrics_server
step "build e2e.test $KUBERNETES_VERSION (long: tens of minutes on two cores)"
build_e2e
rm -rf "$SRC"
step "conformance binaries ready in $CONF_BIN and $COREDNS_BIN"
ls -l "$CONF_BIN" "$COREDNS_BIN" | sed 's/^/    /'
