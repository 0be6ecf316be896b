#!/usr/bin/env bash
# The system packages some tests need (a one-node Slurm for deploy/slurm, headless Chromium for the live
# page), installed where this machine allows it: as root with apt-get,
# `apt-get install -y --no-install-recommends` of those missing; elsewhere it prints what is missing and
# returns 0 (the tests that need them skip, saying why). A quick no-op when everything is installed.
#
# One line per package: the Debian package, then a command it provides (how to tell it is installed).
set -euo pipefail

PACKAGES="
slurm-wlm slurmctld
munge munged
chromium chromium
chromium-driver chromedriver
"

missing=()
while read -r package command; do
    [ -n "$package" ] || continue
    command -v "$command" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$command" >/dev/null 2>&1 ||
        missing+=("$package")
done <<<"$PACKAGES"
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "system_packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }; then
        exit 0
    fi
    echo "system_packages: apt-get could not install ${missing[*]}; the tests that need them will skip"
    exit 0
fi
echo "system_packages: missing ${missing[*]} (install them as root: apt-get install -y ${missing[*]});" \
    "the tests that need them will skip"
exit 0
