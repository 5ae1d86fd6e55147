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
umoci config --image "$L:http" --no-history --clear=config.cmd --config.exposedports 8080/tcp \
    --config.entrypoint /bin/busybox --config.entrypoint httpd --config.entrypoint -f \
    --config.entrypoint -v --config.entrypoint -p --config.entrypoint 8080 \
    --config.entrypoint -h --config.entrypoint /www
umoci tag --image "$L:busybox" pause
umoci config --image "$L:pause" --no-history --clear=config.cmd \
    --config.entrypoint /bin/sh --config.entrypoint -c \
    --config.entrypoint "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait \$!; done"

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
for t in busybox multilayer http pause "multiarch-$ARCH" "multiarch-$OTHER_ARCH"; do
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
push() { # TAG REGISTRY REPO [skopeo options]
    local tag=$1 reg=$2 repo=$3
    shift 3
    sk copy -q --preserve-digests --dest-tls-verify=false --dest-authfile "$NOAUTH" "$@" \
        "oci:$L:$tag" "docker://$reg/$repo:1"
}
push busybox "$OPEN" strake/busybox
push multilayer "$OPEN" strake/multilayer
push multiarch "$OPEN" strake/multiarch --all
push http "$OPEN" strake/http
push pause "$OPEN" strake/pause
push busybox "$PROTECTED" strake/protected --dest-creds "$CREDS"

step "check the registries and write images.txt"
# head_manifest REGISTRY REPO [curl options]: "digest media-type" of REPO:1 as the registry serves it.
head_manifest() {
    local reg=$1 repo=$2
    shift 2
    curl -sfI "$@" -H "Accept: $OCI_INDEX" -H "Accept: $OCI_MANIFEST" \
        "http://$reg/v2/$repo/manifests/1" | tr -d '\r' | awk -F': ' '
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
for entry in open:busybox open:multilayer open:multiarch open:http open:pause protected:protected; do
    which=${entry%%:*} repo=strake/${entry#*:}
    if [ "$which" = open ]; then
        reg=$OPEN auth=() curl_auth=()
    else
        reg=$PROTECTED auth=(--creds "$CREDS") curl_auth=(-u "$CREDS")
    fi
    hm=$(head_manifest "$reg" "$repo" "${curl_auth[@]}")
    read -r digest mtype <<<"$hm"
    # The raw manifest skopeo reads is the one the digest names.
    raw=$(sk inspect --raw --tls-verify=false --authfile "$NOAUTH" "${auth[@]}" "docker://$reg/$repo:1" | sha256sum | cut -d' ' -f1)
    [ "sha256:$raw" = "$digest" ] || { echo "$repo: registry says $digest, content is sha256:$raw" >&2; false; }
    echo "$which $repo:1 $digest $mtype" >>"$WORK/images.txt"
done
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
