#!/usr/bin/env bash
# The whole CUSE suite in ONE throwaway VM whose kernel has CUSE (run directly
# when this kernel already has /dev/cuse). Arguments go to pytest; test paths
# among them replace tests/cuse, e.g.  tests/cuse/run.sh tests/cuse/test_bad_input.py -x
# The shared tools are expected beside the checkout (../shared), or in
# $VTPMCTL_SHARED.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
shared=${VTPMCTL_SHARED:-$repo/../shared}
# The venv's interpreter by full path: a pyenv shim costs seconds in the guest.
py=$repo/.venv/bin/python
cd "$repo"
args=(-m pytest -q -p no:cacheprovider -rs)
args+=("$@")
paths=0
for a in "$@"; do [[ $a != -* && -e ${a%%::*} ]] && paths=1; done
((paths)) || args+=(tests/cuse)
if [[ -c /dev/cuse ]]; then
    exec "$py" "${args[@]}"
fi
exec "$shared/cuse-vm/run-in-cuse-vm" "$py" "${args[@]}"
