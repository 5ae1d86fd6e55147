#!/usr/bin/env bash
# Keeps the test bed's cache ($STRAKE_CACHE) to what the pinned versions use, so that a machine
# that keeps its cache from run to run does not fill its disk with builds it no longer runs.
# Removes, and names each:
#   - the Go build and module caches of the bed's own builds ($STRAKE_CACHE/go-build and
#     go-mod, see lib.sh): every binary they served is built and published by now, and a new
#     pinned version downloads and builds again from the module proxy;
#   - builds of versions other than the pinned ones (kubernetes-v1.37.1 beside v1.37.2, ...);
#   - image sets and busybox builds other than the ones the *-current links name.
# It never touches anything outside $STRAKE_CACHE, nor a hidden entry (locks, a build in
# progress: the build scripts clear their own leftovers when they start).
. "$(dirname "$0")/lib.sh"

step "prune the test bed cache ($STRAKE_CACHE)"
[ -d "$STRAKE_CACHE" ] || exit 0

declare -A keep=()
for d in "$K8S_DIR" "$ETCD_DIR" "$CRI_TOOLS_DIR" "$CNI_DIR" "$GVISOR_DIR" "$CONFORMANCE_DIR" \
    "$COREDNS_DIR" "$METRICS_SERVER_DIR"; do
    keep[${d##*/}]=1
done
for link in "$STRAKE_CACHE"/*-current; do
    [ -L "$link" ] || continue
    keep[${link##*/}]=1
    target=$(readlink "$link")
    keep[${target##*/}]=1
done

freed=0
for entry in "$STRAKE_CACHE"/*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    name=${entry##*/}
    [ -n "${keep[$name]:-}" ] && continue
    kib=$(du -sk "$entry" | cut -f1)
    echo "    remove $name ($((kib / 1024)) MiB)"
    # The module cache is read-only by design.
    if [ -d "$entry" ] && [ ! -L "$entry" ]; then chmod -R u+w "$entry"; fi
    rm -rf "$entry"
    freed=$((freed + kib))
done
echo "    freed $((freed / 1024)) MiB"
# What the tests have to work with (a CI run once failed with "No space left on device").
for d in "$STRAKE_CACHE" "${TMPDIR:-/tmp}"; do
    echo "    free on $d: $(df -BM --output=avail "$d" | tail -1 | tr -d ' ')"
done
