#!/usr/bin/env bash
# Prints shell exports for using the test bed by hand or from a script:
#   eval "$(make -s testbed-env)"
# PATH gains the cached upstream binaries; when `make testbed-up` is running, KUBECONFIG and the
# registry addresses of that test bed are added.
. "$(dirname "$0")/lib.sh"
trap - ERR

echo "export STRAKE_CACHE=$STRAKE_CACHE"
echo "export PATH=$K8S_DIR/bin:$ETCD_DIR/bin:$CRI_TOOLS_DIR/bin:\$PATH"
echo "export CNI_PATH=$CNI_DIR/bin"
if [ -e "$STRAKE_CACHE/images-current" ]; then
    echo "export STRAKE_IMAGES=$(readlink -f "$STRAKE_CACHE/images-current")"
fi
env_file=${STRAKE_TESTBED_ENV:-/run/strake-testbed/env}
if [ -r "$env_file" ]; then
    pid=$(sed -n 's/^export STRAKE_TESTBED_PID=//p' "$env_file")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        cat "$env_file"
    else
        echo "# $env_file is stale (test bed $pid is not running); start one with 'make testbed-up'" 
    fi
else
    echo "# no test bed running: start one with 'make testbed-up' for KUBECONFIG and REGISTRY"
fi
