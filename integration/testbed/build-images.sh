#!/usr/bin/env bash
# Builds the test bed's OCI test images locally, from Debian's busybox-static only (nothing is
# downloaded), and stores them as docker-registry (distribution) storage roots in a cache outside
# the repository:
#
#   $STRAKE_CACHE/images-$KEY/      KEY: this script, the busybox-static version and `uname -m`
#     open/        storage root of the anonymous registry (storage.filesystem.rootdirectory)
#     protected/   storage root of the registry that needs credentials (htpasswd below)
#     htpasswd     bcrypt, user strake, password strake-test-password
#     images.txt   "<open|protected> <repository>:<tag> <digest> <media type>", one per image
#
# Besides our own strake/* images, the open registry holds local equivalents of the images
# critest's conformance specs pull (registry.k8s.io/e2e-test-images/..., registry.k8s.io/pause,
# gcr.io/k8s-staging-cri-tools/test-image-*), under the same repository paths: a runtime that
# mirrors those registries to it runs critest without the internet.
#   $STRAKE_CACHE/images-current -> images-$KEY
#
# Images are made with umoci in an OCI layout, pushed with skopeo to temporary registries on
# 127.0.0.1 (never any other address) whose storage roots are the directories above, checked,
# and published with one rename. A present entry is not rebuilt. See README.md.
. "$(dirname "$0")/lib.sh"
umask 022
export LC_ALL=C
# docker-registry reads REGISTRY_* overrides and skopeo REGISTRY_AUTH_FILE: use only our own.
for v in $(compgen -e); do case $v in REGISTRY_*) unset "$v" ;; esac; done

USER_NAME=strake
USER_PASSWORD=strake-test-password
BUSYBOX=/bin/busybox
PATH_ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
OCI_MANIFEST=application/vnd.oci.image.manifest.v1+json
OCI_INDEX=application/vnd.oci.image.index.v1+json

step "check tools"
for t in docker-registry skopeo umoci htpasswd jq curl openssl sha256sum tar flock dpkg-query; do
    command -v "$t" >/dev/null || { echo "$t is not on PATH (see install-packages.sh)" >&2; false; }
done
[ -x "$BUSYBOX" ] || { echo "$BUSYBOX missing: install busybox-static" >&2; false; }
case $(uname -m) in
    x86_64) ARCH=amd64 OTHER_ARCH=arm64 ;;
    aarch64 | arm64) ARCH=arm64 OTHER_ARCH=amd64 ;;
    ppc64le) ARCH=ppc64le OTHER_ARCH=amd64 ;;
    s390x) ARCH=s390x OTHER_ARCH=amd64 ;;
    riscv64) ARCH=riscv64 OTHER_ARCH=amd64 ;;
    *) echo "unsupported machine $(uname -m)" >&2; false ;;
esac

KEY=$({ cat "$TESTBED_DIR/build-images.sh"; dpkg-query -W -f='${Version}' busybox-static; uname -m; } \
    | sha256sum | cut -c1-16)
FINAL="$STRAKE_CACHE/images-$KEY"

# Point images-current at this build in one rename (readers never see a missing link).
link_current() {
    local tmp="$STRAKE_CACHE/.images-current.$$"
    ln -sfn "images-$KEY" "$tmp"
    mv -T "$tmp" "$STRAKE_CACHE/images-current"
}

if [ -d "$FINAL" ]; then
    echo "cached: $FINAL"
    link_current
    exit 0
fi

step "prepare $FINAL"
mkdir -p "$STRAKE_CACHE"
exec 9>"$STRAKE_CACHE/.images.lock"
flock 9 # one build at a time; leftovers below can only be from an interrupted run
if [ -d "$FINAL" ]; then
    echo "cached: $FINAL (built by a concurrent run)"
    link_current
    exit 0
fi
rm -rf "$STRAKE_CACHE"/.images-build.* "$STRAKE_CACHE"/.images-work.* "$STRAKE_CACHE"/.images-current.*

TMP=$(mktemp -d "$STRAKE_CACHE/.images-build.XXXXXX")  # becomes $FINAL
WORK=$(mktemp -d "$STRAKE_CACHE/.images-work.XXXXXX") # layout, bundles, registry configs, logs
REG_PIDS=()

stop_pid() {
    local pid=$1 _
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
stop_registries() {
    local pid
    for pid in "${REG_PIDS[@]}"; do stop_pid "$pid"; done
    REG_PIDS=()
}
cleanup() {
    trap - ERR
    stop_registries
    rm -rf "$WORK"
    [ -z "$TMP" ] || rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

L="$WORK/layout"
printf '{"default":[{"type":"insecureAcceptAnything"}]}\n' >"$WORK/policy.json"
# skopeo with its own policy and an empty auth file (no credentials from the environment).
sk() { skopeo --policy "$WORK/policy.json" "$@"; }
NOAUTH="$WORK/no-auth.json"

# manifest_of TAG: the descriptor of TAG in the OCI layout.
manifest_of() {
    jq -ce --arg t "$1" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t)' "$L/index.json"
}
blob() { echo "$L/blobs/${1%%:*}/${1#*:}"; }
# layers_of TAG: the layer blob paths of TAG, bottom first.
layers_of() {
    local d
    d=$(manifest_of "$1" | jq -r .digest)
    jq -r '.layers[].digest' "$(blob "$d")" | while read -r l; do blob "$l"; done
}

# derive FROM TO WHAT FUNC: unpack tag FROM, let FUNC change the rootfs, repack the difference
# as one new layer on top, tagged TO. Rootless unpack maps our uid to 0, so the layer's entries
# are owned by root whoever builds.
derive() {
    local from=$1 to=$2 what=$3 fill=$4 b="$WORK/bundle"
    rm -rf "$b"
    umoci unpack --rootless --image "$L:$from" "$b" >/dev/null
    "$fill" "$b/rootfs"
    umoci repack --image "$L:$to" --history.created_by "build-images.sh: $what" "$b"
    rm -rf "$b"
}

fill_pgrep() {
    cat >"$1" <<'EOF'
#!/bin/sh
# pgrep PATTERN: the PIDs of the processes whose name matches the extended regular expression
# PATTERN, one a line; exit status 1 if there is none. (The image's busybox has no pgrep.)
[ $# -eq 1 ] || { echo "usage: pgrep PATTERN" >&2; exit 2; }
status=1
for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    [ "$pid" != $$ ] || continue
    read -r name 2>/dev/null <"$d/comm" || continue
    if printf '%s\n' "$name" | grep -qE -- "$1"; then
        echo "$pid"
        status=0
    fi
done
exit $status
EOF
    chmod 755 "$1"
}
fill_ipcs() {
    cat >"$1" <<'EOF'
#!/bin/sh
# ipcs [-m|-q|-s|-a]: the System V IPC objects of this IPC namespace, as /proc/sysvipc lists
# them (shared memory, message queues, semaphores). (The image's busybox has no ipcs.)
case ${1:--a} in
-m) cat /proc/sysvipc/shm ;;
-q) cat /proc/sysvipc/msg ;;
-s) cat /proc/sysvipc/sem ;;
-a) cat /proc/sysvipc/shm /proc/sysvipc/msg /proc/sysvipc/sem ;;
*) echo "usage: ipcs [-m|-q|-s|-a]" >&2; exit 2 ;;
esac
EOF
    chmod 755 "$1"
}
fill_busybox() {
    local r=$1 a
    mkdir -p "$r"/{bin,dev,etc,proc,root,sys,tmp,var}
    chmod 1777 "$r/tmp"
    chmod 700 "$r/root"
    install -m 755 "$BUSYBOX" "$r/bin/busybox"
    for a in $("$BUSYBOX" --list); do
        [ "$a" = busybox ] || ln -s busybox "$r/bin/$a"
    done
    [ -L "$r/bin/sh" ] || ln -s busybox "$r/bin/sh"
    # Debian's busybox-static has neither pgrep nor ipcs; upstream's busybox images (critest's
    # default container image among them) have both, and critest runs `pgrep sleep` and
    # `ipcs -m`. Stand-ins over /proc.
    [ -e "$r/bin/pgrep" ] || fill_pgrep "$r/bin/pgrep"
    [ -e "$r/bin/ipcs" ] || fill_ipcs "$r/bin/ipcs"
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' \
        >"$r/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nobody:x:65534:' >"$r/etc/group"
    chmod 644 "$r/etc/passwd" "$r/etc/group"
}
fill_ml_add() {
    mkdir -p "$1/data/opaque"
    echo kept >"$1/data/kept.txt"
    echo removed >"$1/data/removed.txt"
    echo old >"$1/data/opaque/old.txt"
}
fill_ml_delete() { rm "$1/data/removed.txt"; }
fill_ml_dir() {
    mkdir -p "$1/data/dir"
    echo file >"$1/data/dir/file.txt"
    ln -s kept.txt "$1/data/link"
}
fill_http() {
    mkdir -p "$1/www/cgi-bin"
    echo "strake http test" >"$1/www/index.html"
    printf '%s\n' '#!/bin/sh' "printf 'Content-Type: text/plain\\r\\n\\r\\n'" 'hostname' >"$1/www/cgi-bin/host"
    chmod 755 "$1/www/cgi-bin/host"
}
# cri-tools' images/image-test adds one empty file named after the image or tag (ADD $TEST $TEST).
fill_marker() {
    : >"$1/$MARKER"
    chmod 644 "$1/$MARKER"
}
# The accounts of cri-tools' images/image-user (www-data, as busybox has it) and
# images/image-predefined-group (default-user 1000 in group-defined-in-image 50000).
fill_users() {
    printf '%s\n' 'www-data:x:33:33:www-data:/var/www:/bin/false' \
        'default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh' >>"$1/etc/passwd"
    printf '%s\n' 'www-data:x:33:' 'default-user:x:1000:' 'group-defined-in-image:x:50000:default-user' \
        >>"$1/etc/group"
}
fill_arch_host() { echo "$ARCH" >"$1/etc/strake-arch"; }
fill_arch_other() { echo "$OTHER_ARCH" >"$1/etc/strake-arch"; }

step "build strake/busybox ($ARCH, busybox-static $(dpkg-query -W -f='${Version}' busybox-static))"
umoci init --layout "$L"
umoci new --image "$L:empty"
derive empty busybox "busybox-static with applet links" fill_busybox
umoci rm --image "$L:empty"
umoci config --image "$L:busybox" --no-history --os linux --architecture "$ARCH" \
    --config.env "$PATH_ENV" --clear=config.cmd --config.cmd /bin/sh

step "build strake/multilayer"
derive busybox multilayer "add /data" fill_ml_add
derive multilayer multilayer "remove /data/removed.txt" fill_ml_delete
derive multilayer multilayer "add /data/dir and /data/link" fill_ml_dir
# The opaque layer is a tar made here: `umoci insert --opaque` (0.4.7) writes the marker but
# leaves the tar stream unterminated (last file unpadded, no end blocks).
mkdir -p "$WORK/opaque/data/opaque"
: >"$WORK/opaque/data/opaque/.wh..wh..opq"
echo new >"$WORK/opaque/data/opaque/new.txt"
tar --format=ustar --sort=name --numeric-owner --owner=0 --group=0 \
    -cf "$WORK/opaque.tar" -C "$WORK/opaque" data
umoci raw add-layer --image "$L:multilayer" \
    --history.created_by "build-images.sh: replace /data/opaque (opaque whiteout)" "$WORK/opaque.tar"
umoci config --image "$L:multilayer" --no-history --clear=config.cmd \
    --config.cmd /bin/sh --config.cmd -c --config.cmd "cat /data/kept.txt; sleep 3600"

step "build strake/http and strake/pause"
derive busybox http "web root" fill_http
# Port 80, as the web servers critest expects (nginx, httpd) listen on. The first log line names
# the server, as httpd's own start-up message does (critest looks for "httpd" in the log).
umoci config --image "$L:http" --no-history --clear=config.cmd --config.exposedports 80/tcp \
    --config.entrypoint /bin/sh --config.entrypoint -c \
    --config.entrypoint 'echo "httpd: serving /www on port 80"; exec /bin/busybox httpd -f -v -p 80 -h /www'
# cri-tools' images/hostnet-nginx: the same web server on port 12003, for host-network pods.
umoci tag --image "$L:http" hostnet-http
umoci config --image "$L:hostnet-http" --no-history --clear=config.entrypoint \
    --clear=config.exposedports --config.exposedports 12003/tcp \
    --config.entrypoint /bin/sh --config.entrypoint -c \
    --config.entrypoint 'echo "httpd: serving /www on port 12003"; exec /bin/busybox httpd -f -v -p 12003 -h /www'
umoci tag --image "$L:busybox" pause
umoci config --image "$L:pause" --no-history --clear=config.cmd \
    --config.entrypoint /bin/sh --config.entrypoint -c \
    --config.entrypoint "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait \$!; done"

step "build critest's test images (cri-tools images/build, from strake/busybox)"
CRITEST_MARKERS=(test all test-image-latest test-image-1 test-image-2 test-image-3 same-image)
for MARKER in "${CRITEST_MARKERS[@]}"; do
    derive busybox "critest-$MARKER" "add /$MARKER" fill_marker
done
derive busybox critest-users "add www-data, default-user, group-defined-in-image" fill_users
# NAME=USER: the image's config.User.
CRITEST_USERS=(uid=1002 username=www-data uid-group=1003:1004 username-group=www-data:1004
    predefined-group=1000)
for u in "${CRITEST_USERS[@]}"; do
    umoci tag --image "$L:critest-users" "critest-user-${u%%=*}"
    umoci config --image "$L:critest-user-${u%%=*}" --no-history --config.user "${u#*=}"
done
umoci rm --image "$L:critest-users"

step "build strake/multiarch (index: linux/$ARCH, linux/$OTHER_ARCH)"
derive busybox "multiarch-$ARCH" "mark $ARCH" fill_arch_host
derive busybox "multiarch-$OTHER_ARCH" "mark $OTHER_ARCH" fill_arch_other
# Same busybox binary (the host's) in both: the other platform's image is for platform
# selection only, not for running.
umoci config --image "$L:multiarch-$OTHER_ARCH" --no-history --architecture "$OTHER_ARCH"
# umoci cannot make an index: write it as a blob and name it in the layout's index.json.
jq -cn --arg mt "$OCI_INDEX" \
    --argjson a "$(manifest_of "multiarch-$ARCH")" --arg aa "$ARCH" \
    --argjson b "$(manifest_of "multiarch-$OTHER_ARCH")" --arg ba "$OTHER_ARCH" \
    '{schemaVersion: 2, mediaType: $mt, manifests: [
        ($a | {mediaType, digest, size, platform: {architecture: $aa, os: "linux"}}),
        ($b | {mediaType, digest, size, platform: {architecture: $ba, os: "linux"}})]}' >"$WORK/index.json"
index_digest=sha256:$(sha256sum <"$WORK/index.json" | cut -d' ' -f1)
cp "$WORK/index.json" "$(blob "$index_digest")"
jq -c --arg mt "$OCI_INDEX" --arg d "$index_digest" --argjson s "$(stat -c %s "$WORK/index.json")" \
    '.manifests += [{mediaType: $mt, digest: $d, size: $s,
        annotations: {"org.opencontainers.image.ref.name": "multiarch"}}]' "$L/index.json" >"$WORK/layout-index.json"
mv "$WORK/layout-index.json" "$L/index.json"

step "check layers (root-owned entries, whiteouts)"
# Every entry of every layer owned by 0/0 (runc runs these images as root). Listings are read
# whole before matching: an early-exiting grep would break the pipe under pipefail.
listing() { tar --numeric-owner -tvzf "$1"; }
critest_tags=()
for m in "${CRITEST_MARKERS[@]}"; do critest_tags+=("critest-$m"); done
for u in "${CRITEST_USERS[@]}"; do critest_tags+=("critest-user-${u%%=*}"); done
for t in busybox multilayer http hostnet-http pause "multiarch-$ARCH" "multiarch-$OTHER_ARCH" "${critest_tags[@]}"; do
    layers=$(layers_of "$t")
    while read -r f; do
        bad=$(listing "$f" | awk '$2 != "0/0"')
        [ -z "$bad" ] || { echo "$t: layer $f has entries not owned by 0/0:" >&2; echo "$bad" >&2; false; }
    done <<<"$layers"
done
layers=$(layers_of multilayer)
mapfile -t ml_layers <<<"$layers"
[ "${#ml_layers[@]}" -eq 5 ] || { echo "multilayer: ${#ml_layers[@]} layers, expected 5" >&2; false; }
# has_entry LAYER-BLOB REGEX: some line of the verbose listing matches REGEX.
has_entry() {
    local l
    l=$(listing "$1")
    grep -qE "$2" <<<"$l" || { echo "layer $1 has no entry matching '$2'; it holds:" >&2; echo "$l" >&2; false; }
}
has_entry "${ml_layers[0]}" '^-rwxr-xr-x 0/0 .* (\./)?bin/busybox$'
has_entry "${ml_layers[0]}" '^lrwxrwxrwx 0/0 .* (\./)?bin/sh -> busybox$'
has_entry "${ml_layers[0]}" '^drwxrwxrwt 0/0 .* (\./)?tmp/?$'
has_entry "${ml_layers[2]}" ' (\./)?data/\.wh\.removed\.txt$'
has_entry "${ml_layers[3]}" ' (\./)?data/link -> kept\.txt$'
has_entry "${ml_layers[4]}" ' (\./)?data/opaque/\.wh\.\.wh\.\.opq$'

step "start temporary registries on 127.0.0.1"
htpasswd -Bbn "$USER_NAME" "$USER_PASSWORD" | sed '/^$/d' >"$TMP/htpasswd"
chmod 644 "$TMP/htpasswd"

# start_registry NAME ROOT [HTPASSWD]: serve ROOT on a free loopback port; sets REG_ADDR.
start_registry() {
    local name=$1 root=$2 auth=${3:-} want=200 port pid code _
    [ -z "$auth" ] || want=401
    mkdir -p "$root"
    for _ in 1 2 3 4 5; do
        port=$((20000 + RANDOM % 12000))
        # Something already answers there: pick another.
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then continue; fi
        {
            echo "version: 0.1"
            echo "log: {level: warn, accesslog: {disabled: true}}"
            echo "storage:"
            echo "  filesystem: {rootdirectory: '$root'}"
            echo "  delete: {enabled: false}"
            echo "  redirect: {disable: true}"
            echo "  maintenance: {uploadpurging: {enabled: false}}"
            echo "http: {addr: '127.0.0.1:$port', secret: '$(openssl rand -hex 16)'}"
            echo "health: {storagedriver: {enabled: false}}"
            [ -z "$auth" ] || echo "auth: {htpasswd: {realm: strake-test, path: '$auth'}}"
        } >"$WORK/registry-$name.yml"
        docker-registry serve "$WORK/registry-$name.yml" >"$WORK/registry-$name.log" 2>&1 &
        pid=$!
        REG_PIDS+=("$pid")
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/v2/" || true)
            if [ "$code" = "$want" ] && kill -0 "$pid" 2>/dev/null; then
                REG_ADDR=127.0.0.1:$port
                echo "    $name registry: 127.0.0.1:$port (pid $pid)"
                return 0
            fi
            sleep 0.1
        done
        stop_pid "$pid"
    done
    echo "registry $name did not start; last log:" >&2
    cat "$WORK/registry-$name.log" >&2 || true
    return 1
}
start_registry open "$TMP/open"
OPEN=$REG_ADDR
start_registry protected "$TMP/protected" "$TMP/htpasswd"
PROTECTED=$REG_ADDR
CREDS="$USER_NAME:$USER_PASSWORD"

step "push images"
# "<open|protected> <layout tag> <repository>:<tag>": what is pushed where (and listed in
# images.txt, in this order).
C=k8s-staging-cri-tools # gcr.io/k8s-staging-cri-tools/... in critest
IMAGES=(
    "open busybox strake/busybox:1"
    "open multilayer strake/multilayer:1"
    "open multiarch strake/multiarch:1"
    "open http strake/http:1"
    "open pause strake/pause:1"
    "protected busybox strake/protected:1"
    # critest: registry.k8s.io/e2e-test-images/..., registry.k8s.io/pause and k8s.gcr.io/pause
    "open busybox e2e-test-images/busybox:1.29-2"
    "open http e2e-test-images/nginx:1.14-2"
    "open http e2e-test-images/httpd:2.4.39-4"
    "open pause pause:3.9"
    # critest: gcr.io/k8s-staging-cri-tools/... (test-image-digest@sha256:9700f9a2... names
    # upstream's bytes, which cannot be rebuilt: it is not here)
    "open critest-test $C/test-image-tag:test"
    "open critest-all $C/test-image-tag:all"
    "open critest-test-image-latest $C/test-image-latest:latest"
    "open critest-test-image-1 $C/test-image-1:latest"
    "open critest-test-image-2 $C/test-image-2:latest"
    "open critest-test-image-3 $C/test-image-3:latest"
    "open critest-same-image $C/test-image-tags:1"
    "open critest-same-image $C/test-image-tags:2"
    "open critest-same-image $C/test-image-tags:3"
    "open critest-user-uid $C/test-image-user-uid:latest"
    "open critest-user-username $C/test-image-user-username:latest"
    "open critest-user-uid-group $C/test-image-user-uid-group:latest"
    "open critest-user-username-group $C/test-image-user-username-group:latest"
    "open critest-user-predefined-group $C/test-image-predefined-group:latest"
    "open hostnet-http $C/hostnet-nginx-$ARCH:latest"
)
for entry in "${IMAGES[@]}"; do
    read -r which tag ref <<<"$entry"
    opts=()
    [ "$tag" != multiarch ] || opts=(--all)
    if [ "$which" = open ]; then reg=$OPEN; else reg=$PROTECTED opts+=(--dest-creds "$CREDS"); fi
    sk copy -q --preserve-digests --dest-tls-verify=false --dest-authfile "$NOAUTH" "${opts[@]}" \
        "oci:$L:$tag" "docker://$reg/$ref"
done

step "check the registries and write images.txt"
# head_manifest REGISTRY REPO:TAG [curl options]: "digest media-type" of REPO:TAG as the registry
# serves it.
head_manifest() {
    local reg=$1 ref=$2
    shift 2
    curl -sfI "$@" -H "Accept: $OCI_INDEX" -H "Accept: $OCI_MANIFEST" \
        "http://$reg/v2/${ref%:*}/manifests/${ref##*:}" | tr -d '\r' | awk -F': ' '
        tolower($1) == "docker-content-digest" { d = $2 }
        tolower($1) == "content-type" { t = $2 }
        END { if (d == "" || t == "") exit 1; print d, t }'
}
sk inspect --raw --tls-verify=false --authfile "$NOAUTH" "docker://$OPEN/strake/busybox:1" >/dev/null
if sk inspect --raw --tls-verify=false --authfile "$NOAUTH" "docker://$PROTECTED/strake/protected:1" >/dev/null 2>&1; then
    echo "the protected registry serves strake/protected:1 without credentials" >&2
    false
fi
: >"$WORK/images.txt"
for entry in "${IMAGES[@]}"; do
    read -r which tag ref <<<"$entry"
    if [ "$which" = open ]; then
        reg=$OPEN auth=() curl_auth=()
    else
        reg=$PROTECTED auth=(--creds "$CREDS") curl_auth=(-u "$CREDS")
    fi
    hm=$(head_manifest "$reg" "$ref" "${curl_auth[@]}")
    read -r digest mtype <<<"$hm"
    # The raw manifest skopeo reads is the one the digest names.
    raw=$(sk inspect --raw --tls-verify=false --authfile "$NOAUTH" "${auth[@]}" "docker://$reg/$ref" | sha256sum | cut -d' ' -f1)
    [ "sha256:$raw" = "$digest" ] || { echo "$ref: registry says $digest, content is sha256:$raw" >&2; false; }
    echo "$which $ref $digest $mtype" >>"$WORK/images.txt"
done
# Tags that name one image in cri-tools name one image here; distinct test images are distinct.
same() { [ "$(awk -v r="$1" '$2 == r { print $3 }' "$WORK/images.txt")" = "$(awk -v r="$2" '$2 == r { print $3 }' "$WORK/images.txt")" ]; }
same "$C/test-image-tags:1" "$C/test-image-tags:3" || { echo "$C/test-image-tags: tags differ" >&2; false; }
! same "$C/test-image-1:latest" "$C/test-image-2:latest" || { echo "$C/test-image-1 = -2" >&2; false; }
! same "$C/test-image-tag:test" "$C/test-image-tag:all" || { echo "$C/test-image-tag: test = all" >&2; false; }
grep -q "^open strake/multiarch:1 $index_digest $OCI_INDEX\$" "$WORK/images.txt" \
    || { echo "strake/multiarch:1 is not the index built ($index_digest)" >&2; false; }
for d in $(jq -r '.manifests[].digest' "$WORK/index.json"); do
    sk inspect --raw --tls-verify=false --authfile "$NOAUTH" "docker://$OPEN/strake/multiarch@$d" >/dev/null
done
mv "$WORK/images.txt" "$TMP/images.txt"
sed 's/^/    /' "$TMP/images.txt"

step "publish $FINAL"
stop_registries
publish_dir "$TMP" "$FINAL"
TMP=""
link_current
step "test images ready: $STRAKE_CACHE/images-current -> images-$KEY"
