#!/usr/bin/env bash
# Build the Debian sid root folder holding Asterisk 22 and SIPp for the real-PBX
# tests (tests/support/pbx). Idempotent: does nothing when the folder is already there.
#
#   PBX_ROOT   where to put it (default /var/cache/agi-gateway/pbx-root); kept
#              outside the checkout so a fresh CI clone reuses it.
#
# Needs root (mmdebstrap, chroot). Builds into a temporary folder beside the
# target and renames it at the end, so an interrupted build never leaves a
# half-made root that the tests would take for a good one.
set -euo pipefail

PBX_ROOT="${PBX_ROOT:-/var/cache/agi-gateway/pbx-root}"
PACKAGES="asterisk,asterisk-modules,sip-tester,procps"

ready() {
    [ -x "$1/usr/sbin/asterisk" ] && [ -x "$1/usr/bin/sipp" ] && [ -x "$1/usr/sbin/chroot" ]
}

if ready "$PBX_ROOT"; then
    echo "pbx-root: $PBX_ROOT is ready"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "pbx-root: must run as root to build $PBX_ROOT" >&2
    exit 1
fi

if ! command -v mmdebstrap >/dev/null 2>&1; then
    echo "pbx-root: installing mmdebstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends mmdebstrap
fi

parent="$(dirname "$PBX_ROOT")"
mkdir -p "$parent"
# One build at a time (two CI jobs on one machine would race on the rename).
exec 9>"$parent/.pbx-root.lock"
flock 9
if ready "$PBX_ROOT"; then
    echo "pbx-root: $PBX_ROOT was built meanwhile"
    exit 0
fi

tmp="$(mktemp -d "$parent/.pbx-root.build.XXXXXX")"
cleanup() { rm -rf --one-file-system "$tmp"; }
trap cleanup EXIT

echo "pbx-root: building $PBX_ROOT (sid: $PACKAGES)"
# No mirror argument: mmdebstrap's default is right here. Check-Valid-Until is
# off because sid's Release file is often older than its validity window on
# these machines. mmdebstrap wants an empty or missing target folder.
rmdir "$tmp"
mmdebstrap --variant=apt \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --include="$PACKAGES" \
    sid "$tmp"

if ! ready "$tmp"; then
    echo "pbx-root: build finished but asterisk/sipp are missing" >&2
    exit 1
fi
mkdir -p "$tmp/run"
# A partial leftover from an older layout would block the rename.
if [ -e "$PBX_ROOT" ]; then
    rm -rf --one-file-system "$PBX_ROOT"
fi
mv "$tmp" "$PBX_ROOT"
trap - EXIT
echo "pbx-root: $PBX_ROOT is ready"
