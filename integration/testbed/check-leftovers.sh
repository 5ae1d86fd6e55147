#!/usr/bin/env bash
# Run after the tests (`make test` does): nothing the tests started or made may be left behind.
# Lists and fails on what remains of the test bed: network namespaces (`strake-tb-*`), mounts
# under a test's temporary directory or a bed namespace, cgroups named after a bed parent, processes
# run from the workspace's or the bed's binaries or working in a test's directory, and nftables
# tables of strake-proxy in the root namespace. It only reads; it removes nothing.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
tmp="${TMPDIR:-/tmp}"
tmp="${tmp%/}"
left=()

for ns in /run/netns/strake-tb-*; do
    [[ -e $ns ]] && left+=("network namespace ${ns##*/}")
done

while read -r _ target _; do
    case "$target" in
    "$tmp"/.tmp* | */strake-tb-*) left+=("mount $target") ;;
    esac
done </proc/mounts

while IFS= read -r dir; do
    left+=("cgroup $dir")
done < <(find /sys/fs/cgroup -mindepth 1 -maxdepth 8 -type d -name 'strake-tb-*' 2>/dev/null)

self=$$
for proc in /proc/[0-9]*; do
    pid=${proc#/proc/}
    [[ $pid == "$self" ]] && continue
    exe=$(readlink "$proc/exe" 2>/dev/null) || continue
    cmd=$(tr '\0' ' ' <"$proc/cmdline" 2>/dev/null) || continue
    case "$exe" in
    "$root"/target/* | /var/cache/strake/*)
        left+=("process $pid $cmd")
        continue
        ;;
    esac
    case "$cmd" in
    *"$tmp"/.tmp* | *strake-tb-*) left+=("process $pid $cmd") ;;
    esac
done

while read -r _ family name; do
    [[ $name == strake* ]] && left+=("nftables table $family $name")
done < <(nft list tables 2>/dev/null)

if ((${#left[@]})); then
    echo "leftovers after the tests (${#left[@]}):" >&2
    printf '  %s\n' "${left[@]}" >&2
    exit 1
fi
echo "leftovers: none (network namespaces, mounts, cgroups, processes, nftables tables)"
