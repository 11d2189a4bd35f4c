#!/usr/bin/env bash
# Debian packages for the multi-node tests: a real single-machine Slurm (slurm-wlm, munge) and
# two simulated ssh nodes (openssh-server, pdsh, iproute2). Needs root and apt-get; without them
# it does nothing and those tests skip, saying why.
#
# Another apt or dpkg process (an unattended upgrade, a parallel CI job) may hold the package
# locks: this waits for them, up to ZEROFORGE_APT_LOCK_TIMEOUT seconds (default 600), instead of
# failing at once. ZEROFORGE_SYSTEM_PACKAGES replaces the package list (space-separated).
set -euo pipefail
read -r -a PACKAGES <<< "${ZEROFORGE_SYSTEM_PACKAGES:-slurm-wlm munge openssh-server openssh-client pdsh iproute2}"
LOCK_TIMEOUT=${ZEROFORGE_APT_LOCK_TIMEOUT:-600}
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "system-deps: not root or no apt-get; Slurm and two-node tests will skip" >&2
    exit 0
fi
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# DPkg::Lock::Timeout makes apt wait for the dpkg locks. `apt-get update` also takes the
# package-lists lock, which that option does not cover (apt 2.6): retry it while it is busy.
APT=(apt-get -o "DPkg::Lock::Timeout=$LOCK_TIMEOUT")
deadline=$((SECONDS + LOCK_TIMEOUT))
err=$(mktemp)
trap 'rm -f "$err"' EXIT
until "${APT[@]}" update -qq >/dev/null 2>"$err"; do
    if ! grep -q "Could not get lock" "$err" || [ "$SECONDS" -ge "$deadline" ]; then
        cat "$err" >&2
        exit 1
    fi
    echo "system-deps: waiting for the apt package-lists lock (another apt process holds it)" >&2
    sleep 2
done
"${APT[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
