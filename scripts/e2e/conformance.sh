#!/usr/bin/env bash
# libiscsi's target conformance suite against a running Bulwark: every test of
# `iscsi-test-cu -t ALL` over two portals of one target (so MultipathIO runs), then the
# ReadOnly suite against a read-only LUN. Fails on any failed test and on any skipped
# test other than those that need removable media or a write-protected LUN, or
# SANITIZE CRYPTO ERASE (Bulwark does not encrypt data at rest, so it does not claim
# cryptographic erase).
#
# All 230 tests run, in one invocation, but Sanitize.Reset runs as its own suite
# instance: in a two-portal run the suite's previous test (Sanitize.Reservations) leaves
# a RESERVE(6) held by the second session, so SANITIZE in Sanitize.Reset must get
# RESERVATION CONFLICT from any correct target. A suite instance of its own starts
# with fresh sessions, as the test assumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

step "conformance: iscsi-test-cu"
work=$(mktemp -d /tmp/bulwark-conformance.XXXXXX)
trap 'stop_bulwark; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
cat >"$work/bulwark.toml" <<TOML
[server]
queue_depth = 64
# libiscsi's Sanitize.Reset sleeps 60 s between commands without servicing its socket
# (it answers no NOP-In meanwhile); the default 15 s would drop it as dead.
nop_timeout_ms = 90000

[[target]]
iqn = "iqn.2026-11.io.bulwark:conformance"
portals = ["127.0.0.1:3260", "127.0.0.2:3260"]
# libiscsi's Reserve6.TargetColdReset/TargetWarmReset send target resets, which a
# target refuses unless it allows them.
allow_target_reset = true
# LUN 0 reports physical = logical blocks: libiscsi's GetLBAStatus.UnmapSingle assumes
# that (it expects a descriptor at LBA i+LBPPB for a request at LBA i+1, which SBC-3
# only allows for LBPPB=1). LUN 1 reports 4 KiB physical blocks (the default) for the
# five tests that run only when LBPPB > 1.
[[target.lun]]
lun = 0
path = "$work/rw.img"
size = "128MiB"
physical_block_size = 512
[[target.lun]]
lun = 1
path = "$work/rw4k.img"
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

url1="iscsi://127.0.0.1/iqn.2026-11.io.bulwark:conformance/0"
url2="iscsi://127.0.0.2/iqn.2026-11.io.bulwark:conformance/0"
timeout 900 iscsi-test-cu -d -S -t "$CONFORMANCE_ALL" "$url1" "$url2" >"$work/all.txt" 2>&1 || true
ran=$(grep -E '^\s+tests\s' "$work/all.txt" | tail -1 | awk '{print $3}')
[ "$ran" = "$(all_test_count)" ] || die "the run did not cover every test of ALL ($ran ran)"
# The LBPPB < 2 skips of this run are the five tests run against LUN 1 below.
check_run "ALL (2 portals)" "$work/all.txt" 'LBPPB < 2. Skipping test'
[ "$(grep -c 'LBPPB < 2' "$work/all.txt")" -le 5 ] || die "more LBPPB skips than the LUN 1 run covers"

lbppb_tests='ALL.CompareAndWrite.InvalidDataOutSize,ALL.WriteSame10.InvalidDataOutSize,ALL.WriteSame16.InvalidDataOutSize,ALL.WriteSame10.UnmapUnaligned,ALL.WriteSame16.UnmapUnaligned'
timeout 300 iscsi-test-cu -d -S -t "$lbppb_tests" "iscsi://127.0.0.1/iqn.2026-11.io.bulwark:conformance/1" "iscsi://127.0.0.2/iqn.2026-11.io.bulwark:conformance/1" >"$work/lbppb.txt" 2>&1 || true
check_run "LBPPB > 1 tests (LUN 1, 4 KiB physical blocks)" "$work/lbppb.txt"
[ "$(grep -E '^\s+tests\s' "$work/lbppb.txt" | awk '{print $3}')" = 5 ] || die "the LBPPB run did not run its 5 tests"

timeout 300 iscsi-test-cu -d -S -t ALL.ReadOnly "iscsi://127.0.0.1/iqn.2026-11.io.bulwark:readonly/0" >"$work/ro.txt" 2>&1 || true
check_run "ReadOnly (read-only LUN)" "$work/ro.txt"
if grep -F '[SKIPPED]' "$work/ro.txt"; then
    die "ReadOnly suite skipped tests against a read-only LUN"
fi

if grep -E 'panicked' "$work/bulwark.log"; then
    die "bulwark panicked during the conformance run"
fi
stop_bulwark
