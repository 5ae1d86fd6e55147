#!/usr/bin/env bash
# Builds vanilla BusyBox (upstream's release tarball, no distribution patches) as one static
# binary for the conformance bed's busybox, nonroot and nonewprivs images, into the cache:
#
#   $STRAKE_CACHE/busybox-$BUSYBOX_VERSION-$KEY/bin/busybox
#                     KEY = sha256(this script, gcc and glibc versions, uname -m)[:16]
#   $STRAKE_CACHE/busybox-current -> busybox-$BUSYBOX_VERSION-$KEY
#
# Upstream's e2e-test-images/busybox is Docker Hub's busybox of that version: `make defconfig`
# of the release tarball. Debian's busybox-static (build-images.sh still uses it) is not a
# stand-in for it: Debian reverts upstream commit 9c143ce5 (debian/patches/
# revert-9c143ce52da11ec3d21a3491c3749841d3dc10f0.patch), so its `sh` drops environment
# variables whose names are not shell identifiers, and the [Conformance] specs read variables
# such as `p-data-1`, `1-data-1` and `$_-data-1` back with `sh -c env`. The script checks that
# the binary it built keeps them.
#
# The tarball comes from Debian's pool, where the source package keeps upstream's file unchanged
# as busybox_<version>.orig.tar.bz2 (the same SHA256 as busybox.net's busybox-<version>.tar.bz2,
# pinned below); DEBIAN_MIRROR overrides the mirror.
. "$(dirname "$0")/lib.sh"
umask 022
export LC_ALL=C

BUSYBOX_VERSION=1.37.0
BUSYBOX_SHA256=3311dff32e746499f4df0d5df04d7eb396382d7e108bb9250e7b519b837043a4
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BUSYBOX_URL="$DEBIAN_MIRROR/pool/main/b/busybox/busybox_$BUSYBOX_VERSION.orig.tar.bz2"

step "check tools for busybox $BUSYBOX_VERSION"
for t in gcc make bzip2 curl sha256sum tar flock getconf readelf; do
    command -v "$t" >/dev/null || { echo "$t is not on PATH (see install-packages.sh)" >&2; false; }
done
KEY=$({ cat "$TESTBED_DIR/build-busybox.sh"; gcc --version | sed -n 1p; getconf GNU_LIBC_VERSION; uname -m; } |
    sha256sum | cut -c1-16)
NAME="busybox-$BUSYBOX_VERSION-$KEY"
FINAL="$STRAKE_CACHE/$NAME"
link_current() {
    local tmp="$STRAKE_CACHE/.busybox-current.$$"
    ln -sfn "$NAME" "$tmp"
    mv -T "$tmp" "$STRAKE_CACHE/busybox-current"
}
if [ -x "$FINAL/bin/busybox" ]; then
    echo "    cached: $FINAL/bin/busybox"
    link_current
    exit 0
fi

step "prepare $FINAL"
mkdir -p "$STRAKE_CACHE"
exec 9>"$STRAKE_CACHE/.busybox.lock"
flock 9
if [ -x "$FINAL/bin/busybox" ]; then echo "    cached: $FINAL/bin/busybox (built by a concurrent run)"; link_current; exit 0; fi
rm -rf "$STRAKE_CACHE"/.busybox-build.*
TMP=$(mktemp -d "$STRAKE_CACHE/.busybox-build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
T0=$(date +%s)

step "download busybox $BUSYBOX_VERSION ($BUSYBOX_URL)"
curl -sSf --retry 3 -o "$TMP/busybox.tar.bz2" "$BUSYBOX_URL"
echo "$BUSYBOX_SHA256  $TMP/busybox.tar.bz2" | sha256sum -c --quiet
tar -xjf "$TMP/busybox.tar.bz2" -C "$TMP"
S="$TMP/busybox-$BUSYBOX_VERSION"

step "build busybox $BUSYBOX_VERSION (make defconfig, CONFIG_STATIC=y, $(gcc --version | sed -n 1p))"
# The build date in the banner is the release's (the tarball's Makefile), not today's; the
# configuration steps write it already.
export SOURCE_DATE_EPOCH
SOURCE_DATE_EPOCH=$(stat -c %Y "$S/Makefile")
make -C "$S" -s defconfig >/dev/null
sed -i 's/^# CONFIG_STATIC is not set$/CONFIG_STATIC=y/' "$S/.config"
# Options that CONFIG_STATIC brings in take their defaults.
(yes '' || true) | make -C "$S" -s oldconfig >/dev/null
grep -qx CONFIG_STATIC=y "$S/.config" || { echo "CONFIG_STATIC=y did not stick in .config" >&2; false; }
if ! make -C "$S" -j"$(nproc)" busybox >"$TMP/build.log" 2>&1; then
    tail -40 "$TMP/build.log" >&2
    false
fi

step "check the binary"
BB="$S/busybox"
"$BB" --help 2>&1 | sed -n 1p | grep -q "^BusyBox v$BUSYBOX_VERSION " ||
    { echo "$BB does not say BusyBox v$BUSYBOX_VERSION" >&2; false; }
if LC_ALL=C readelf -l "$BB" 2>/dev/null | grep -q INTERP; then
    echo "$BB is dynamically linked" >&2
    false
fi
# What the ConfigMap/Secrets environment specs need of `sh`.
out=$(env -i 'p-data-1=value-1' '1-data-1=value-1' '$_-data-1=value-1' '#@!data-1=value-1' "$BB" sh -c env)
for v in 'p-data-1=value-1' '1-data-1=value-1' '$_-data-1=value-1' '#@!data-1=value-1'; do
    grep -qxF "$v" <<<"$out" || { echo "busybox sh -c env drops $v; it printed:" >&2; echo "$out" >&2; false; }
done
echo "    $("$BB" --help 2>&1 | sed -n 1p | sed 's/ multi-call binary\.$//'), $("$BB" --list | wc -l) applets"

step "publish $FINAL"
mkdir -p "$TMP/out/bin"
install -m 755 "$BB" "$TMP/out/bin/busybox"
install -m 644 "$S/.config" "$TMP/out/config"
publish_dir "$TMP/out" "$FINAL"
link_current
echo "    built in $(($(date +%s) - T0)) s, $(du -h "$FINAL/bin/busybox" | cut -f1)"
