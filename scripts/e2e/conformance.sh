#!/usr/bin/env bash
# libiscsi's target conformance suite against a running Bulwark: every test of
# `iscsi-test-cu -t ALL` over two portals of one target (so MultipathIO runs), then the
# ReadOnly suite against a read-only LUN. Fails on any failed test and on any skipped
# test other than those that need removable media or a write-protected LUN.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

step "conformance: iscsi-test-cu"
work=$(mktemp -d /tmp/bulwark-conformance.XXXXXX)
trap 'stop_bulwark; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
cat >"$work/bulwark.toml" <<TOML
[server]
queue_depth = 64

[[target]]
iqn = "iqn.2026-11.io.bulwark:conformance"
portals = ["127.0.0.1:3260", "127.0.0.2:3260"]
[[target.lun]]
lun = 0
path = "$work/rw.img"
size = "128MiB"

[[target]]
iqn = "iqn.2026-11.io.bulwark:readonly"
portals = ["127.0.0.1:3260"]
[[target.lun]]
lun = 0
path = "$work/ro.img"
size = "16MiB"
read_only = true
TOML
# The read-only LUN's file must exist before it is opened read-only.
truncate -s 16M "$work/ro.img"
start_bulwark "$work/bulwark.toml" "$work/bulwark.log"

check_run() {
    local name=$1 out=$2
    local summary failed ran
    summary=$(grep -E '^\s+tests\s' "$out" | tail -1)
    [ -n "$summary" ] || { tail -40 "$out"; die "$name: iscsi-test-cu printed no summary"; }
    ran=$(echo "$summary" | awk '{print $3}')
    failed=$(echo "$summary" | awk '{print $5}')
    echo "$name: $summary"
    if [ "$failed" != "0" ]; then
        grep -E 'FAILED' "$out" | head -40
        die "$name: $failed failed tests"
    fi
    local bad_skips
    bad_skips=$(grep -F '[SKIPPED]' "$out" | grep -v -e 'not removable' -e 'not write-protected' || true)
    if [ -n "$bad_skips" ]; then
        echo "$bad_skips"
        die "$name: tests skipped for a reason other than removable media or write protection"
    fi
    echo "$name: $ran tests ran, 0 failed, only removable-media/write-protect skips"
}

url1="iscsi://127.0.0.1/iqn.2026-11.io.bulwark:conformance/0"
url2="iscsi://127.0.0.2/iqn.2026-11.io.bulwark:conformance/0"
timeout 900 iscsi-test-cu -d -S -t ALL "$url1" "$url2" >"$work/all.txt" 2>&1 || true
check_run "ALL (2 portals)" "$work/all.txt"

timeout 300 iscsi-test-cu -d -S -t ALL.ReadOnly "iscsi://127.0.0.1/iqn.2026-11.io.bulwark:readonly/0" >"$work/ro.txt" 2>&1 || true
check_run "ReadOnly (read-only LUN)" "$work/ro.txt"
if grep -F '[SKIPPED]' "$work/ro.txt"; then
    die "ReadOnly suite skipped tests against a read-only LUN"
fi

if grep -E 'panicked' "$work/bulwark.log"; then
    die "bulwark panicked during the conformance run"
fi
stop_bulwark
