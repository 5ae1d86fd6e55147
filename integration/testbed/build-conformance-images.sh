#!/usr/bin/env bash
# Builds the images upstream's [Conformance] specs run (test/utils/image/manifest.go of the
# pinned Kubernetes), locally, under their upstream repository names, and stores them as a
# docker-registry storage root in the cache:
#
#   $STRAKE_CACHE/conformance-images-$KEY/
#     open/        storage root: serve it read-only and mirror registry.k8s.io to it
#     images.txt   "open <repository>:<tag> <digest> <media type>", one per image
#   $STRAKE_CACHE/conformance-images-current -> conformance-images-$KEY
#
# Userland images are Debian bookworm root filesystems made with mmdebstrap from Debian's
# packages (real bash, curl, netcat-openbsd, dig, getent, iproute2, socat: the tools the specs
# call), not busybox look-alikes. The busybox images hold vanilla BusyBox built from upstream's
# tarball by build-busybox.sh (as upstream's image, which is Docker Hub's busybox; Debian's
# busybox-static differs). The Go binaries come from build-conformance.sh and
# build-upstream.sh; pause is upstream's pause.c compiled statically. What each image is, and
# what cannot be built offline, is in docs/CONFORMANCE.md.
. "$(dirname "$0")/lib.sh"
umask 022
export LC_ALL=C
for v in $(compgen -e); do case $v in REGISTRY_*) unset "$v" ;; esac; done

DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PATH_ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
E2E=e2e-test-images

step "check tools and binaries"
for t in mmdebstrap docker-registry skopeo umoci jq curl openssl sha256sum tar flock gcc strip; do
    command -v "$t" >/dev/null || { echo "$t is not on PATH (apt-get install mmdebstrap gcc; see install-packages.sh)" >&2; false; }
done
case $(uname -m) in
    x86_64) ARCH=amd64 ;;
    aarch64 | arm64) ARCH=arm64 ;;
    *) echo "unsupported machine $(uname -m)" >&2; false ;;
esac
AGNHOST="$CONFORMANCE_DIR/bin/agnhost"
SAMPLE_APISERVER="$CONFORMANCE_DIR/bin/sample-apiserver"
NNP="$CONFORMANCE_DIR/bin/nnp"
COREDNS="$COREDNS_DIR/bin/coredns"
ETCD="$ETCD_DIR/bin/etcd"
for b in "$AGNHOST" "$SAMPLE_APISERVER" "$NNP" "$COREDNS" "$ETCD"; do
    [ -x "$b" ] || { echo "$b is missing: run build-conformance.sh (and build-upstream.sh) first" >&2; false; }
done
# The pinned k8s.io/kubernetes source: pause.c, agnhost's porter certificates, kitten/nautilus.
K8S_SRC=$(cd "$(mktemp -d)" && GOTOOLCHAIN=local GOFLAGS=-mod=mod go mod download -json \
    "k8s.io/kubernetes@$KUBERNETES_VERSION" | jq -r .Dir)
[ -f "$K8S_SRC/build/pause/linux/pause.c" ] || { echo "no pause.c in $K8S_SRC" >&2; false; }

step "build vanilla busybox (build-busybox.sh, cached)"
bash "$TESTBED_DIR/build-busybox.sh"
BUSYBOX="$(readlink -f "$STRAKE_CACHE/busybox-current")/bin/busybox"
[ -x "$BUSYBOX" ] || { echo "$BUSYBOX is missing after build-busybox.sh" >&2; false; }
# The version must be the one upstream's busybox image is made of (its BASEIMAGE).
BUSYBOX_VERSION=$(sed -n "s|^linux/$ARCH=.*busybox:\([0-9.]*\)$|\1|p" "$K8S_SRC/test/images/busybox/BASEIMAGE")
"$BUSYBOX" --help 2>&1 | sed -n 1p | grep -q "^BusyBox v$BUSYBOX_VERSION " ||
    { echo "$BUSYBOX is not busybox $BUSYBOX_VERSION (test/images/busybox/BASEIMAGE of $KUBERNETES_VERSION)" >&2; false; }

KEY=$({ cat "$TESTBED_DIR/build-conformance-images.sh"; sha256sum "$AGNHOST" "$SAMPLE_APISERVER" "$NNP" "$COREDNS" "$ETCD" "$BUSYBOX"
    echo "$KUBERNETES_VERSION $DEBIAN_SUITE"; uname -m; } | sha256sum | cut -c1-16)
FINAL="$STRAKE_CACHE/conformance-images-$KEY"
link_current() {
    local tmp="$STRAKE_CACHE/.conformance-images-current.$$"
    ln -sfn "conformance-images-$KEY" "$tmp"
    mv -T "$tmp" "$STRAKE_CACHE/conformance-images-current"
}
if [ -d "$FINAL" ]; then
    echo "cached: $FINAL"
    link_current
    exit 0
fi

step "prepare $FINAL"
exec 9>"$STRAKE_CACHE/.conformance-images.lock"
flock 9
if [ -d "$FINAL" ]; then echo "cached: $FINAL (built by a concurrent run)"; link_current; exit 0; fi
rm -rf "$STRAKE_CACHE"/.conformance-images-build.* "$STRAKE_CACHE"/.conformance-images-work.*
TMP=$(mktemp -d "$STRAKE_CACHE/.conformance-images-build.XXXXXX")
WORK=$(mktemp -d "$STRAKE_CACHE/.conformance-images-work.XXXXXX")
REG_PID=""
cleanup() {
    trap - ERR
    if [ -n "$REG_PID" ]; then
        kill -TERM "$REG_PID" 2>/dev/null || true
        wait "$REG_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    [ -z "$TMP" ] || rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

L="$WORK/layout"
printf '{"default":[{"type":"insecureAcceptAnything"}]}\n' >"$WORK/policy.json"
sk() { skopeo --policy "$WORK/policy.json" "$@"; }
umoci init --layout "$L"
T0=$(date +%s)

# debian NAME PACKAGES HOOK...: a bookworm root filesystem with PACKAGES (and their
# dependencies, no recommends), documentation and the package lists left out, /dev left to the
# runtime; each HOOK is an mmdebstrap --customize-hook. Written to $WORK/NAME.tar.
debian() {
    local name=$1 pkgs=$2 hooks=() h
    shift 2
    for h in "$@"; do hooks+=(--customize-hook="$h"); done
    mmdebstrap --quiet --variant=essential --include="$pkgs" --skip=output/dev \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*' \
        "${hooks[@]}" "$DEBIAN_SUITE" "$WORK/$name.tar" "$DEBIAN_MIRROR"
}

# from_tar TAG TAR WHAT: a new image TAG whose only layer is TAR.
from_tar() {
    umoci new --image "$L:$1"
    umoci raw add-layer --image "$L:$1" --history.created_by "build-conformance-images.sh: $3" "$2"
    umoci config --image "$L:$1" --no-history --os linux --architecture "$ARCH" --config.env "$PATH_ENV"
}
# add_dir TAG DIR WHAT: DIR (owned by root) as one more layer on TAG.
add_dir() {
    tar --sort=name --numeric-owner --owner=0 --group=0 -cf "$WORK/layer.tar" -C "$2" .
    umoci raw add-layer --image "$L:$1" --history.created_by "build-conformance-images.sh: $3" "$WORK/layer.tar"
    rm -f "$WORK/layer.tar"
}
# retag FROM TO: TO is a copy of FROM's manifest (changed by later umoci config calls).
retag() { umoci tag --image "$L:$1" "$2"; }
# blank DIR: an empty root-owned skeleton (etc, tmp 1777) for static binaries.
skeleton() {
    mkdir -p "$1"/{etc,tmp,root}
    chmod 1777 "$1/tmp"
    printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' >"$1/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nobody:x:65534:' >"$1/etc/group"
}

step "build agnhost (Debian $DEBIAN_SUITE userland + agnhost $(cat "$K8S_SRC/test/images/agnhost/VERSION"))"
# test/images/agnhost/Dockerfile: bind-tools (dig), curl, netcat-openbsd, iproute2 (ss, ip),
# iperf, bash, util-linux-misc (ipcs), socat; coredns in /; /uploads; porter's certificate;
# user-defined-in-image (1000) in group-defined-in-image (50000); /agnhost-2 -> agnhost.
mkdir -p "$WORK/agnhost-files/uploads"
install -m 755 "$AGNHOST" "$WORK/agnhost-files/agnhost"
ln -s agnhost "$WORK/agnhost-files/agnhost-2"
install -m 755 "$COREDNS" "$WORK/agnhost-files/coredns"
install -m 644 "$K8S_SRC/test/images/agnhost/porter/localhost.crt" "$K8S_SRC/test/images/agnhost/porter/localhost.key" \
    "$WORK/agnhost-files/"
debian agnhost passwd,bash,curl,ca-certificates,netcat-openbsd,dnsutils,iproute2,iputils-ping,iperf,socat,util-linux,procps,libc-bin \
    'chroot "$1" groupadd -g 50000 group-defined-in-image' \
    'chroot "$1" useradd -u 1000 -m -G group-defined-in-image user-defined-in-image' \
    'ln -sf /usr/bin/iperf "$1"/usr/local/bin/iperf'
from_tar agnhost "$WORK/agnhost.tar" "Debian $DEBIAN_SUITE: bash curl netcat-openbsd dnsutils iproute2 iperf socat util-linux"
add_dir agnhost "$WORK/agnhost-files" "agnhost, coredns, porter certificate, /uploads"
umoci config --image "$L:agnhost" --no-history --config.workingdir / \
    --config.entrypoint /agnhost --config.cmd pause \
    --config.exposedports 80/tcp --config.exposedports 8080/tcp --config.exposedports 8081/tcp \
    --config.exposedports 9376/tcp --config.exposedports 5000/tcp

step "build kitten and nautilus (agnhost test-webserver + their pictures)"
for img in kitten nautilus; do
    mkdir -p "$WORK/$img"
    install -m 644 "$K8S_SRC/test/images/$img/html/$img.jpg" "$K8S_SRC/test/images/$img/html/data.json" "$WORK/$img/"
    retag agnhost "$img"
    add_dir "$img" "$WORK/$img" "$img.jpg, data.json"
    umoci config --image "$L:$img" --no-history --clear=config.cmd --config.cmd test-webserver
done

step "build glibc-dns-testing (Debian $DEBIAN_SUITE + dnsutils + coredns)"
debian glibc-dns-testing bash,dnsutils,libc-bin,iproute2
mkdir -p "$WORK/glibc-files"
install -m 755 "$COREDNS" "$WORK/glibc-files/coredns"
from_tar glibc-dns-testing "$WORK/glibc-dns-testing.tar" "Debian $DEBIAN_SUITE: dnsutils"
add_dir glibc-dns-testing "$WORK/glibc-files" "coredns"
umoci config --image "$L:glibc-dns-testing" --no-history --config.cmd bash

step "build nginx (Debian $DEBIAN_SUITE nginx, configured as the nginx image)"
# As the upstream nginx image: port 80, /usr/share/nginx/html, logs on stdout/stderr, master in
# the foreground, pid file /var/run/nginx.pid, worker user nginx, stop signal SIGQUIT.
cat >"$WORK/nginx.conf" <<'EOF'
user nginx;
worker_processes auto;
error_log /dev/stderr notice;
pid /var/run/nginx.pid;
events { worker_connections 1024; }
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log /dev/stdout;
    sendfile on;
    keepalive_timeout 65;
    server {
        listen 80;
        server_name localhost;
        location / { root /usr/share/nginx/html; index index.html index.htm; }
        error_page 500 502 503 504 /50x.html;
        location = /50x.html { root /usr/share/nginx/html; }
    }
}
EOF
debian nginx passwd,nginx,bash,curl \
    'chroot "$1" useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nginx' \
    "cp $WORK/nginx.conf \"\$1\"/etc/nginx/nginx.conf" \
    'rm -f "$1"/etc/nginx/sites-enabled/*'
from_tar nginx "$WORK/nginx.tar" "Debian $DEBIAN_SUITE: nginx"
umoci config --image "$L:nginx" --no-history --config.cmd nginx --config.cmd -g --config.cmd 'daemon off;' \
    --config.exposedports 80/tcp --config.stopsignal SIGQUIT
# The specs roll Deployments from one nginx version to the other: two distinct images.
for v in 1.27.0-2 1.28.0-2; do
    mkdir -p "$WORK/nginx-$v/etc"
    echo "$v" >"$WORK/nginx-$v/etc/e2e-image-version"
    retag nginx "nginx-$v"
    add_dir "nginx-$v" "$WORK/nginx-$v" "e2e image version $v"
done

step "build busybox, nonroot and nonewprivs (vanilla busybox $BUSYBOX_VERSION, static)"
B="$WORK/busybox"
skeleton "$B"
mkdir -p "$B/bin"
install -m 755 "$BUSYBOX" "$B/bin/busybox"
for a in $("$BUSYBOX" --list); do [ "$a" = busybox ] || ln -s busybox "$B/bin/$a"; done
[ -L "$B/bin/sh" ] || ln -s busybox "$B/bin/sh"
sed -i 's|/sbin/nologin|/bin/sh|' "$B/etc/passwd"
tar --sort=name --numeric-owner --owner=0 --group=0 -cf "$WORK/busybox.tar" -C "$B" .
from_tar busybox "$WORK/busybox.tar" "busybox $BUSYBOX_VERSION (upstream tarball, defconfig, static) with applet links"
umoci config --image "$L:busybox" --no-history --config.cmd sh
retag busybox nonroot
umoci config --image "$L:nonroot" --no-history --config.user 1234
# test/images/nonewprivs/Dockerfile: nnp (prints its effective uid) setuid root, CMD ["nnp"].
# The spec runs it as uid 1000 with allowPrivilegeEscalation false and expects uid 1000.
N="$WORK/nonewprivs"
mkdir -p "$N/usr/local/bin"
install -m 4755 "$NNP" "$N/usr/local/bin/nnp"
retag busybox nonewprivs
add_dir nonewprivs "$N" "nnp of kubernetes $KUBERNETES_VERSION test/images/nonewprivs, setuid root"
umoci config --image "$L:nonewprivs" --no-history --clear=config.cmd --config.cmd nnp

step "build pause (upstream build/pause/linux/pause.c, static)"
P="$WORK/pause"
skeleton "$P"
# As build/pause/Makefile: CFLAGS = -Os -Wall -Werror -static -DVERSION=v$(TAG)-$(REV)
gcc -Os -Wall -Werror -static -DVERSION="v3.10.2-strake" -o "$P/pause" "$K8S_SRC/build/pause/linux/pause.c"
strip "$P/pause"
tar --sort=name --numeric-owner --owner=0 --group=0 -cf "$WORK/pause.tar" -C "$P" .
from_tar pause "$WORK/pause.tar" "pause.c of kubernetes $KUBERNETES_VERSION, gcc -static"
umoci config --image "$L:pause" --no-history --config.entrypoint /pause --config.user 65535:65535

step "build sample-apiserver and etcd (static Go binaries)"
S="$WORK/sample-apiserver"
skeleton "$S"
install -m 755 "$SAMPLE_APISERVER" "$S/sample-apiserver"
tar --sort=name --numeric-owner --owner=0 --group=0 -cf "$WORK/sample-apiserver.tar" -C "$S" .
from_tar sample-apiserver "$WORK/sample-apiserver.tar" "k8s.io/sample-apiserver v0.${KUBERNETES_VERSION#v1.}"
umoci config --image "$L:sample-apiserver" --no-history --config.entrypoint /sample-apiserver
D="$WORK/etcd"
skeleton "$D"
mkdir -p "$D/usr/local/bin" "$D/var/lib/etcd"
install -m 755 "$ETCD" "$D/usr/local/bin/etcd"
tar --sort=name --numeric-owner --owner=0 --group=0 -cf "$WORK/etcd.tar" -C "$D" .
from_tar etcd "$WORK/etcd.tar" "etcd $ETCD_VERSION"
umoci config --image "$L:etcd" --no-history --config.cmd /usr/local/bin/etcd

step "start a temporary registry on 127.0.0.1"
mkdir -p "$TMP/open"
for _ in 1 2 3 4 5; do
    port=$((20000 + RANDOM % 12000))
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then continue; fi
    cat >"$WORK/registry.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: '$TMP/open'}
  delete: {enabled: false}
  redirect: {disable: true}
  maintenance: {uploadpurging: {enabled: false}}
http: {addr: '127.0.0.1:$port', secret: '$(openssl rand -hex 16)'}
health: {storagedriver: {enabled: false}}
EOF
    docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
    REG_PID=$!
    for _ in $(seq 100); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/v2/" || true)
        [ "$code" = 200 ] && break
        kill -0 "$REG_PID" 2>/dev/null || break
        sleep 0.1
    done
    [ "$code" = 200 ] && break
    kill "$REG_PID" 2>/dev/null || true
    wait "$REG_PID" 2>/dev/null || true
    REG_PID=""
done
[ -n "$REG_PID" ] || { echo "registry did not start:" >&2; cat "$WORK/registry.log" >&2; false; }
REG=127.0.0.1:$port

step "push images under their upstream names (registry.k8s.io/...)"
# "<layout tag> <repository>:<tag>" as test/utils/image/manifest.go of $KUBERNETES_VERSION names
# them (registry.k8s.io is mirrored to this registry).
IMAGES=(
    "agnhost $E2E/agnhost:2.66.1"
    "agnhost $E2E/agnhost:2.55"
    "busybox $E2E/busybox:1.37.0-2"
    "nginx-1.27.0-2 $E2E/nginx:1.27.0-2"
    "nginx-1.28.0-2 $E2E/nginx:1.28.0-2"
    "kitten $E2E/kitten:1.8"
    "nautilus $E2E/nautilus:1.8"
    "glibc-dns-testing $E2E/glibc-dns-testing:2.1.1"
    "sample-apiserver $E2E/sample-apiserver:1.29.2"
    "nonroot $E2E/nonroot:1.5"
    "nonewprivs $E2E/nonewprivs:1.4"
    "etcd etcd:3.7.0-0"
    "pause pause:3.10.2"
    "coredns-image coredns/coredns:$COREDNS_VERSION"
)
# CoreDNS as the cluster DNS runs as its upstream image does: /coredns with -conf.
C="$WORK/coredns"
skeleton "$C"
install -m 755 "$COREDNS" "$C/coredns"
tar --sort=name --numeric-owner --owner=0 --group=0 -cf "$WORK/coredns.tar" -C "$C" .
from_tar coredns-image "$WORK/coredns.tar" "coredns $COREDNS_VERSION"
umoci config --image "$L:coredns-image" --no-history --config.entrypoint /coredns \
    --config.exposedports 53/udp --config.exposedports 53/tcp

# Each name must be one manifest.go (or the CoreDNS manifest) really uses.
for entry in "${IMAGES[@]}"; do
    read -r _ ref <<<"$entry"
    repo=${ref%:*} tag=${ref##*:}
    case $repo in
        coredns/coredns) grep -q "registry.k8s.io/$ref" "$K8S_SRC/cluster/addons/dns/coredns/coredns.yaml.base" ;;
        *) grep -qE "\"${repo##*/}\", \"$tag\"" "$K8S_SRC/test/utils/image/manifest.go" ;;
    esac || { echo "$ref is not an image of kubernetes $KUBERNETES_VERSION" >&2; false; }
done
for entry in "${IMAGES[@]}"; do
    read -r tag ref <<<"$entry"
    sk copy -q --preserve-digests --dest-tls-verify=false "oci:$L:$tag" "docker://$REG/$ref"
done

step "check the registry and write images.txt"
: >"$WORK/images.txt"
for entry in "${IMAGES[@]}"; do
    read -r _ ref <<<"$entry"
    hm=$(curl -sfI -H "Accept: application/vnd.oci.image.manifest.v1+json" \
        "http://$REG/v2/${ref%:*}/manifests/${ref##*:}" | tr -d '\r' | awk -F': ' '
        tolower($1) == "docker-content-digest" { d = $2 }
        tolower($1) == "content-type" { t = $2 }
        END { if (d == "" || t == "") exit 1; print d, t }')
    echo "open $ref $hm" >>"$WORK/images.txt"
done
mv "$WORK/images.txt" "$TMP/images.txt"
sed 's/^/    /' "$TMP/images.txt"

step "publish $FINAL"
kill -TERM "$REG_PID"
wait "$REG_PID" 2>/dev/null || true
REG_PID=""
publish_dir "$TMP" "$FINAL"
TMP=""
link_current
echo "    built in $(($(date +%s) - T0)) s, $(du -sh "$FINAL" | cut -f1)"
step "conformance images ready: $STRAKE_CACHE/conformance-images-current -> conformance-images-$KEY"
