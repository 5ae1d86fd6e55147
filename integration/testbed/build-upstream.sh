#!/usr/bin/env bash
# Builds the upstream binaries of the test bed from their Go modules at the versions pinned in
# integration/versions.env, into a cache outside the repository keyed by version. A component
# whose cache entry exists is not rebuilt; each entry is built in a temporary directory and
# renamed into place only when complete. No upstream source is kept in the repository.
. "$(dirname "$0")/lib.sh"

export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0 GOPROXY=${GOPROXY:-https://proxy.golang.org}
command -v go >/dev/null || { step "find go"; echo "go is not on PATH" >&2; false; }
mkdir -p "$STRAKE_CACHE"

# gomod DIR MODULE@VERSION [replace lines...]: a throw-away module that requires MODULE, so that
# `go build` can build packages of a module whose own go.mod holds local replace directives
# (which `go install pkg@version` refuses).
gomod() {
    local dir=$1 req=$2
    shift 2
    mkdir -p "$dir"
    {
        echo "module strake.invalid/testbed"
        echo "go 1.26"
        echo "require ${req%@*} ${req#*@}"
        for r in "$@"; do echo "replace $r"; done
    } >"$dir/go.mod"
}

build_kubernetes() {
    local final="$K8S_DIR" tmp minor
    [ -x "$final/bin/kube-apiserver" ] && { echo "    cached: $final"; return; }
    tmp=$(mktemp -d "$STRAKE_CACHE/.kubernetes.XXXXXX")
    minor=${KUBERNETES_VERSION#v1.}
    minor=${minor%%.*}
    local staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
        cloud-provider cluster-bootstrap code-generator component-base component-helpers
        controller-manager cri-api cri-client cri-streaming csi-translation-lib
        dynamic-resource-allocation endpointslice externaljwt kms kube-aggregator
        kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics mount-utils
        pod-security-admission sample-apiserver streaming)
    local repl=() s
    for s in "${staging[@]}"; do repl+=("k8s.io/$s => k8s.io/$s v0.${KUBERNETES_VERSION#v1.}"); done
    gomod "$tmp/src" "k8s.io/kubernetes@$KUBERNETES_VERSION" "${repl[@]}"
    local v=k8s.io/component-base/version cv=k8s.io/client-go/pkg/version
    local ld="-s -w"
    for p in $v $cv; do
        ld+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
        ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
    done
    (cd "$tmp/src" && go build -trimpath -ldflags "$ld" -o "$tmp/bin/" \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler \
        k8s.io/kubernetes/cmd/kubectl \
        k8s.io/kubernetes/cmd/kubelet \
        k8s.io/kubernetes/cmd/kube-proxy)
    rm -rf "$tmp/src"
    publish_dir "$tmp" "$final"
}

build_etcd() {
    local final="$ETCD_DIR" tmp
    [ -x "$final/bin/etcd" ] && { echo "    cached: $final"; return; }
    tmp=$(mktemp -d "$STRAKE_CACHE/.etcd.XXXXXX")
    local mods=(api/v3 client/pkg/v3 client/v3 pkg/v3 server/v3) repl=() m
    for m in "${mods[@]}"; do repl+=("go.etcd.io/etcd/$m => go.etcd.io/etcd/$m $ETCD_VERSION"); done
    gomod "$tmp/src" "go.etcd.io/etcd/server/v3@$ETCD_VERSION" "${repl[@]}"
    (cd "$tmp/src" && go build -trimpath -ldflags "-s -w" -o "$tmp/bin/etcd" go.etcd.io/etcd/server/v3)
    rm -rf "$tmp/src"
    publish_dir "$tmp" "$final"
}

build_cri_tools() {
    local final="$CRI_TOOLS_DIR" tmp
    [ -x "$final/bin/critest" ] && { echo "    cached: $final"; return; }
    tmp=$(mktemp -d "$STRAKE_CACHE/.cri-tools.XXXXXX")
    gomod "$tmp/src" "sigs.k8s.io/cri-tools@$CRI_TOOLS_VERSION"
    local ld="-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRI_TOOLS_VERSION"
    (cd "$tmp/src" && go build -trimpath -ldflags "$ld" -o "$tmp/bin/crictl" sigs.k8s.io/cri-tools/cmd/crictl \
        && go test -c -trimpath -ldflags "$ld" -o "$tmp/bin/critest" sigs.k8s.io/cri-tools/cmd/critest)
    rm -rf "$tmp/src"
    publish_dir "$tmp" "$final"
}

build_cni_plugins() {
    local final="$CNI_DIR" tmp p pkgs=()
    [ -x "$final/bin/bridge" ] && { echo "    cached: $final"; return; }
    tmp=$(mktemp -d "$STRAKE_CACHE/.cni-plugins.XXXXXX")
    gomod "$tmp/src" "github.com/containernetworking/plugins@$CNI_PLUGINS_VERSION"
    for p in main/bridge main/loopback main/ptp main/host-device ipam/host-local meta/portmap meta/bandwidth meta/firewall meta/tuning; do
        pkgs+=("github.com/containernetworking/plugins/plugins/$p")
    done
    (cd "$tmp/src" && go build -trimpath -ldflags "-s -w" -o "$tmp/bin/" "${pkgs[@]}")
    rm -rf "$tmp/src"
    publish_dir "$tmp" "$final"
}

step "build kubernetes $KUBERNETES_VERSION (kube-apiserver, controller-manager, scheduler, kubectl, kubelet, kube-proxy)"
build_kubernetes
step "build etcd $ETCD_VERSION"
build_etcd
step "build cri-tools $CRI_TOOLS_VERSION (crictl, critest)"
build_cri_tools
step "build CNI plugins $CNI_PLUGINS_VERSION"
build_cni_plugins
build_gvisor() {
    local final="$GVISOR_DIR" tmp
    [ -x "$final/bin/runsc" ] && { echo "    cached: $final"; return; }
    tmp=$(mktemp -d "$STRAKE_CACHE/.gvisor.XXXXXX")
    gomod "$tmp/src" "gvisor.dev/gvisor@$GVISOR_VERSION"
    (cd "$tmp/src" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" \
        -o "$tmp/bin/runsc" gvisor.dev/gvisor/runsc)
    rm -rf "$tmp/src"
    publish_dir "$tmp" "$final"
}

step "build gVisor runsc $GVISOR_VERSION"
build_gvisor
step "upstream binaries ready"
