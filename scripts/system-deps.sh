#!/usr/bin/env bash
# Debian packages for the multi-node tests: a real single-machine Slurm (slurm-wlm, munge) and
# two simulated ssh nodes (openssh-server, pdsh, iproute2). Needs root and apt-get; without them
# it does nothing and those tests skip, saying why.
set -euo pipefail
PACKAGES=(slurm-wlm munge openssh-server openssh-client pdsh iproute2)
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
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
