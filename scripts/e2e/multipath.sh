#!/usr/bin/env bash
# ALUA multipath across nodes: libiscsi's whole conformance suite (`iscsi-test-cu -t
# ALL`) with its two paths on two different nodes of a 3-node cluster, one path on the
# primary (active/optimized) and one on another node (active/non-optimized: every
# command forwarded to the primary), and at the same time, against a second target,
# with the paths swapped. MultipathIO and every PersistentReserveIn/Out test must run
# and pass on both orders, which shows that reservations, unit attentions and resets
# hold across nodes.
#
# Allowed skips, as in conformance.sh (removable media, write protection, SANITIZE
# CRYPTO ERASE), and no others: a replicated volume is thin (LBPME=1), so the UNMAP,
# WRITE SAME with UNMAP, GET LBA STATUS and SANITIZE BLOCK ERASE tests run through both
# paths, each deallocation going through the replication stream (issue 21). As in
# conformance.sh, the two ALL runs use volumes whose physical block is the logical one
# (`--physical-block-size 512`): libiscsi's GetLBAStatus.UnmapSingle assumes that; the
# five tests that need several logical blocks per physical block run on a third volume
# with the default 4 KiB physical blocks. Afterwards `bulwark volume verify` finds
# every replica identical, deallocations included.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

step "multipath: iscsi-test-cu -t ALL across two nodes of a cluster, both ways round"
work=$(mktemp -d /tmp/bulwark-multipath.XXXXXX)
trap 'stop_demo; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
# libiscsi's Sanitize.Reset sleeps 60 s without servicing its sockets (see
# conformance.sh); the nodes the demo starts inherit this.
export BULWARK_NOP_TIMEOUT_MS=90000
start_demo "$work"

# Two volumes on all three nodes, each the LUN of its own target: the two orders of the
# paths run at once, one per target (libiscsi's Sanitize.Reset spends a minute asleep);
# a third for the tests of several logical blocks per physical block.
for i in 1 2 3; do
    physical=(--physical-block-size 512)
    [ "$i" = 3 ] && physical=()
    "$BULWARK_BIN" volume create "mp$i" 128MiB --replicas 3 "${physical[@]}" >/dev/null
    "$BULWARK_BIN" target create "iqn.2026-11.io.bulwark:multipath$i" >/dev/null
    "$BULWARK_BIN" target allow-any "iqn.2026-11.io.bulwark:multipath$i" >/dev/null
    # libiscsi's Reserve6.TargetColdReset/TargetWarmReset send target resets.
    "$BULWARK_BIN" target settings "iqn.2026-11.io.bulwark:multipath$i" --allow-target-reset on >/dev/null
    "$BULWARK_BIN" lun add "iqn.2026-11.io.bulwark:multipath$i" "mp$i" >/dev/null
done

# The primary's portal and another in-sync node's, once both serve the target.
paths() {
    "$BULWARK_BIN" status --json | python3 -c '
import json, sys
d = json.load(sys.stdin)["state"]
v = d["volumes"][sys.argv[1]]
if sorted(v["in_sync"]) != sorted(v["replicas"]):
    sys.exit(0)
other = [n for n in v["in_sync"] if n != v["primary"]][0]
print(d["nodes"][str(v["primary"])]["addresses"]["portals"][0].rsplit(":", 1)[0],
      d["nodes"][str(other)]["addresses"]["portals"][0].rsplit(":", 1)[0])
' "$1"
}
declare -A optimized non_optimized
for i in 1 2 3; do
    iqn=iqn.2026-11.io.bulwark:multipath$i
    for _ in $(seq 1 100); do
        read -r optimized[$i] non_optimized[$i] < <(paths "mp$i") || true
        if [ -n "${non_optimized[$i]:-}" ] && iscsi-inq "iscsi://${non_optimized[$i]}/$iqn/0" >/dev/null 2>&1 \
            && iscsi-inq "iscsi://${optimized[$i]}/$iqn/0" >/dev/null 2>&1; then
            break
        fi
        sleep 0.2
    done
    [ -n "${non_optimized[$i]:-}" ] || die "the replicas of mp$i never were all in sync"
    echo "$iqn: active/optimized path via ${optimized[$i]}, active/non-optimized path via ${non_optimized[$i]}"
done

# One discovery through any node lists every node's portal, each its own portal group.
iscsi-ls -s "iscsi://${non_optimized[1]}" >"$work/ls.txt"
[ "$(grep -c "Target:iqn.2026-11.io.bulwark:multipath1 Portal:" "$work/ls.txt")" -eq 3 ] \
    || { cat "$work/ls.txt"; die "SendTargets via ${non_optimized[1]} does not list the 3 nodes' portals"; }

expected=$(all_test_count)
# Target 1: optimized path first; target 2: non-optimized path first.
run() { # i first second
    timeout 480 iscsi-test-cu -d -S -t "$CONFORMANCE_ALL" \
        "iscsi://$2/iqn.2026-11.io.bulwark:multipath$1/0" "iscsi://$3/iqn.2026-11.io.bulwark:multipath$1/0" \
        >"$work/all-$1.txt" 2>&1 || true
}
run 1 "${optimized[1]}" "${non_optimized[1]}" &
first=$!
run 2 "${non_optimized[2]}" "${optimized[2]}" &
second=$!
wait "$first" "$second"
for i in 1 2; do
    out=$work/all-$i.txt
    if [ "$i" = 1 ]; then order="optimized path first"; else order="non-optimized path first"; fi
    ran=$(grep -E '^\s+tests\s' "$out" | tail -1 | awk '{print $3}')
    [ "$ran" = "$expected" ] || { tail -30 "$out"; die "$order: $ran of $expected tests ran"; }
    # The LBPPB < 2 skips are the five tests run on mp3 below.
    check_run "ALL, $order" "$out" 'LBPPB < 2. Skipping test'
    [ "$(grep -c 'LBPPB < 2' "$out")" -le 5 ] || die "$order: more LBPPB skips than the mp3 run covers"
    # MultipathIO and the reservation suites ran every test, none skipped.
    for suite in MultipathIO PrinReadKeys PrinServiceactionRange PrinReportCapabilities \
        ProutClear ProutPreempt ProutRegister ProutReserve; do
        awk -v s="Suite: $suite" '$0 ~ "^Suite: " {on = ($0 == s)} on' "$out" >"$work/suite.txt"
        [ -s "$work/suite.txt" ] || die "$order: suite $suite did not run"
        if grep -q SKIPPED "$work/suite.txt"; then cat "$work/suite.txt"; die "$order: suite $suite skipped tests"; fi
    done
done
lbppb_tests='ALL.CompareAndWrite.InvalidDataOutSize,ALL.WriteSame10.InvalidDataOutSize,ALL.WriteSame16.InvalidDataOutSize,ALL.WriteSame10.UnmapUnaligned,ALL.WriteSame16.UnmapUnaligned'
timeout 300 iscsi-test-cu -d -S -t "$lbppb_tests" "iscsi://${optimized[3]}/iqn.2026-11.io.bulwark:multipath3/0" \
    "iscsi://${non_optimized[3]}/iqn.2026-11.io.bulwark:multipath3/0" >"$work/lbppb.txt" 2>&1 || true
check_run "LBPPB > 1 tests (mp3, 4 KiB physical blocks)" "$work/lbppb.txt"
[ "$(grep -E '^\s+tests\s' "$work/lbppb.txt" | awk '{print $3}')" = 5 ] || die "the LBPPB run did not run its 5 tests"

# Every replica holds what the primary holds, deallocated ranges included.
for i in 1 2 3; do
    "$BULWARK_BIN" volume verify "mp$i" >"$work/verify-$i.txt" 2>&1 \
        || { cat "$work/verify-$i.txt"; die "volume verify mp$i: the replicas differ after the conformance run"; }
    echo "mp$i: $(tail -1 "$work/verify-$i.txt")"
done
for log in "$work"/data/n*.log; do
    if grep -E 'panicked' "$log"; then die "a node panicked during the multipath run ($log)"; fi
done
echo "multipath: ok"
