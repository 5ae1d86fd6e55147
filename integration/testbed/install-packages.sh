#!/usr/bin/env bash
# Installs the Debian packages the test bed and Strake's tests need. Idempotent: packages
# already present are not fetched again.
. "$(dirname "$0")/lib.sh"

PACKAGES=(
    runc crun nftables conntrack iproute2 iptables containernetworking-plugins
    docker-registry skopeo umoci busybox-static openssl apache2-utils
    protobuf-compiler libprotobuf-dev containerd curl ca-certificates jq util-linux procps
    # the conformance bed's images (build-conformance-images.sh): Debian root filesystems, pause;
    # vanilla busybox from its release tarball (build-busybox.sh)
    mmdebstrap gcc libc6-dev make bzip2
    # systemd-analyze, which verifies manifests/systemd/ (integration/tests/systemd_units.rs),
    # and `systemd --user` with its session bus, the real manager the systemd cgroup driver's
    # tests talk to (crates/strake-kubelet/tests/systemd_cgroups.rs); nothing makes it PID 1
    systemd dbus-user-session
)

step "check Debian packages"
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "    all ${#PACKAGES[@]} packages present"
    exit 0
fi

step "apt-get update"
apt-get update -q

step "apt-get install ${missing[*]}"
# The packaged services (docker-registry, containerd) must not start on the host's
# interfaces: the test bed starts its own instances with its own configs on loopback.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
[ "$created_policy" = 1 ] && rm -f "$policy"
true
