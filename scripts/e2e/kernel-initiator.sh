#!/usr/bin/env bash
# A real initiator against a real cluster: Linux's open-iscsi and dm-multipath, in a
# Debian 12 guest under QEMU, against a 3-node Bulwark cluster, through faults.
#
# - The guest image (Debian 12, its distribution kernel, open-iscsi, multipath-tools,
#   sg3-utils, fio, e2fsprogs) is built once with mmdebstrap and cached under
#   /var/cache/bulwark-vm/<hash> (scripts/vm/build-image.sh); each run boots a qcow2
#   overlay of it with QEMU (KVM when /dev/kvm works, TCG otherwise), direct kernel boot.
# - Everything runs in a network namespace of its own (bwvm-PID): a bridge holding the
#   nodes' addresses 198.18.0.1-3 and QEMU's tap, the guest at 198.18.0.10. Nothing
#   touches the host's network.
# - Host and guest talk through a virtio-9p share: the guest's agent
#   (scripts/vm/guest-agent.sh) runs the commands the host drops there, with the
#   functions of scripts/vm/guest-lib.sh.
#
# It applies `bulwark initiator-config`'s output in the guest as it is (and fails when
# multipathd or iscsid reject a line), logs in to both nodes of a 2-replica volume,
# checks ALUA (sg_rtpg, multipath -ll) and persistent reservations across the paths,
# makes an ext4 file system on the multipath device and, for each fault, runs a
# verifying fio job and an O_DSYNC 4 KiB writer through it, and measures the largest
# gap between two completed writes of the latter:
#   (a) kill -9 of the primary that is also the Raft leader
#   (b) kill -9 of a primary that is not the leader
#   (c) a planned move (bulwark volume move)
#   (d) SIGTERM of the primary node, restarted at once
# Then: fstrim of a deleted 64 MiB file gives its space back on every replica (the
# volume is thin: UNMAP goes through the replication stream), fsck clean, every fio
# verify clean, the canary file intact, reservations seen through both paths, no I/O
# error above dm-multipath in the guest's kernel log.
#
# KI_REPORT_ONLY=1 prints the gaps without failing on them (baselines). KEEP=1 keeps
# the work folder (always kept on failure). BULWARK_BIN picks the binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

# Largest application I/O gap allowed per case, in milliseconds.
KI_LIMIT_A_MS=${KI_LIMIT_A_MS:-2000}
KI_LIMIT_B_MS=${KI_LIMIT_B_MS:-2000}
KI_LIMIT_C_MS=${KI_LIMIT_C_MS:-500}
KI_LIMIT_D_MS=${KI_LIMIT_D_MS:-500}
KI_REPORT_ONLY=${KI_REPORT_ONLY:-0}
# Seconds of I/O per case, and when in it the fault comes.
KI_RUNTIME=${KI_RUNTIME:-15}
KI_FAULT_AT=${KI_FAULT_AT:-4}
# How long the cluster and the paths get to come back between cases.
KI_SETTLE_TIMEOUT=${KI_SETTLE_TIMEOUT:-120}

BULWARK_BIN=$(readlink -f "${BULWARK_BIN:-target/debug/bulwark}")
IQN=iqn.2026-11.io.bulwark:kernel-initiator
VOL=ki
NS=bwvm-$$
ADDR=("" 198.18.0.1 198.18.0.2 198.18.0.3)
# The guest is 198.18.0.10 (set by scripts/vm/guest-agent.sh).
START=$(date +%s)

[ "$(id -u)" -eq 0 ] || die "kernel-initiator needs root (network namespace, tap device)"
[ -x "$BULWARK_BIN" ] || die "no bulwark binary at $BULWARK_BIN (cargo build -p bulwark, or BULWARK_BIN=...)"

step "kernel-initiator: guest image"
ensure_vm_packages
t0=$(date +%s)
IMAGE=$(scripts/vm/build-image.sh | tail -1)
[ -e "$IMAGE/complete" ] || die "no guest image"
echo "image $IMAGE (kernel $(cat "$IMAGE/kernel-version")), ready in $(($(date +%s) - t0)) s"

work=$(mktemp -d /tmp/bulwark-ki.XXXXXX)
share=$work/share
mkdir -p "$share/cmd" "$share/res"
FAILS=()
fail() { echo "CHECK FAILED: $*" >&2; FAILS+=("$*"); }
declare -A NPID
QPID=""

cleanup() {
    local rc=$?
    set +e
    if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then
        kill -TERM "$QPID"
        for _ in $(seq 1 50); do kill -0 "$QPID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$QPID" 2>/dev/null && kill -KILL "$QPID"
    fi
    for i in 1 2 3; do
        local p=${NPID[$i]:-}
        [ -n "$p" ] && kill -0 "$p" 2>/dev/null && kill -KILL "$p"
    done
    wait 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    if [ "$rc" -eq 0 ] && [ -z "${KEEP:-}" ]; then
        rm -rf "$work"
    else
        echo "kernel-initiator: work folder kept: $work (node logs n*.log, serial.log, share/res)" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap "exit 130" INT TERM

# --- network namespace: bridge with the nodes' addresses, QEMU's tap on it ---
step "kernel-initiator: network namespace $NS (198.18.0.0/24 on a bridge)"
ip netns add "$NS"
nsx() { ip netns exec "$NS" "$@"; }
nsx ip link set lo up
nsx ip link add br0 type bridge
nsx ip link set br0 up
for i in 1 2 3; do nsx ip addr add "${ADDR[$i]}/24" dev br0; done
nsx ip tuntap add dev tap0 mode tap
nsx ip link set tap0 master br0
nsx ip link set tap0 up

# --- the cluster ---
node_start() { # i
    local i=$1 log=$work/n$1.log n
    n=$(grep -c '^Ready' "$log" 2>/dev/null || true)
    echo "--- start $(date -u +%T.%N)" >>"$log"
    # ip netns exec execs the program: $! is the node's own pid.
    ip netns exec "$NS" "$BULWARK_BIN" serve --data-dir "$work/n$i" >>"$log" 2>&1 &
    NPID[$i]=$!
    for _ in $(seq 1 300); do
        [ "$(grep -c '^Ready' "$log" || true)" -gt "${n:-0}" ] && return 0
        kill -0 "${NPID[$i]}" 2>/dev/null || { tail -20 "$log"; die "node n$i exited at start"; }
        sleep 0.1
    done
    tail -20 "$log"
    die "node n$i not ready within 30 s"
}
node_alive() { [ -n "${NPID[$1]:-}" ] && kill -0 "${NPID[$1]}" 2>/dev/null; }
node_stop() { # i SIGNAL: signals the node and waits for it to exit
    local i=$1 sig=$2 p=${NPID[$1]}
    kill "-$sig" "$p"
    for _ in $(seq 1 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$p" 2>/dev/null && { kill -KILL "$p"; fail "node n$i did not exit within 30 s of SIG$sig"; }
    wait "$p" 2>/dev/null || true
    NPID[$i]=""
}
# The CLI, through a node that runs.
cli() {
    local i
    for i in 1 2 3; do
        if node_alive "$i"; then
            BULWARK_NODE=${ADDR[$i]} nsx "$BULWARK_BIN" "$@"
            return
        fi
    done
    die "no node runs"
}
# One line about the volume: primary=nN leader=nN in_sync=0|1 replicas=nN,nN epoch=N.
# In sync: every replica in the in-sync set, no resync pending, no move under way, and
# the primary serving the target (the other nodes' ports forward and are not listed).
vol_state() {
    cli status --json 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
st = d["state"]; names = {int(k): v["name"] for k, v in st["nodes"].items()}
v = st["volumes"][sys.argv[1]]
leaders = [n["Ok"]["raft"]["leader"] for n in d["nodes"].values() if "Ok" in n and n["Ok"]["raft"].get("leader")]
leader = max(set(leaders), key=leaders.count) if leaders else None
resyncing = any(x["resyncs"] or x.get("resync_pending_regions") for n in d["nodes"].values() if "Ok" in n
                for x in n["Ok"]["volumes"] if x["name"] == sys.argv[1])
serving = [int(k) for k, n in d["nodes"].items() if "Ok" in n and sys.argv[2] in n["Ok"]["serving"]]
in_sync = (sorted(v["in_sync"]) == sorted(v["replicas"]) and not resyncing and v["moving_to"] is None
           and v["primary"] in serving)
print("primary=%s leader=%s in_sync=%d replicas=%s epoch=%s" % (names.get(v["primary"]), names.get(leader),
      int(in_sync), ",".join(names[r] for r in v["replicas"]), v["epoch"]))
' "$VOL" "$IQN"
}
field() { sed -n "s/.*\\b$1=\\([^ ]*\\).*/\\1/p" <<<"$2"; }
idx() { echo "${1#n}"; }

step "kernel-initiator: 3-node cluster on ${ADDR[1]}, ${ADDR[2]}, ${ADDR[3]} ($BULWARK_BIN)"
nsx "$BULWARK_BIN" cluster init --name n1 --address "${ADDR[1]}" --data-dir "$work/n1" --json >"$work/init.json"
BULWARK_TOKEN=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["token"])' "$work/init.json")
export BULWARK_TOKEN
node_start 1
for i in 2 3; do
    nsx "$BULWARK_BIN" cluster join "${ADDR[1]}" --name "n$i" --address "${ADDR[$i]}" --data-dir "$work/n$i" --json >/dev/null
    node_start "$i"
done
for _ in $(seq 1 300); do
    [ "$(cli status --json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d["nodes"]["1"]["Ok"]["raft"]["voters"]))' 2>/dev/null)" = 3 ] && break
    sleep 0.2
done
cli volume create "$VOL" 256MiB --replicas 2 --on n1 --on n2 >/dev/null
cli target create "$IQN" >/dev/null
cli lun add "$IQN" "$VOL" >/dev/null
cli target allow-any "$IQN" >/dev/null
wait_sync() { # timeout: waits for both replicas in sync and serving; prints the state
    local s end=$((SECONDS + $1))
    while :; do
        s=$(vol_state || true)
        [ "$(field in_sync "$s")" = 1 ] && { echo "$s"; return 0; }
        [ "$SECONDS" -lt "$end" ] || { echo "$s"; return 1; }
        sleep 0.5
    done
}
st=$(wait_sync 60) || die "volume $VOL not in sync: $st"
echo "cluster: $st"
cli initiator-config >"$share/initiator-config.txt"

# --- the guest ---
step "kernel-initiator: guest"
cp scripts/vm/guest-agent.sh "$share/agent.sh"
cp scripts/vm/guest-lib.sh "$share/guest-lib.sh"
# KVM when it works for a stock kernel. A nested host whose KVM is the paravirtual
# kvm-pvm module only runs guests built for PVM (a Debian kernel hangs at boot there),
# and some nested hosts refuse -cpu host's MSRs: then TCG, which is slow.
kvm_usable() {
    [ -e /sys/module/kvm_pvm ] && { KVM_WHY="/dev/kvm is kvm-pvm (runs PVM-built guest kernels only)"; return 1; }
    [ -r /dev/kvm ] && [ -w /dev/kvm ] || { KVM_WHY="no usable /dev/kvm"; return 1; }
    qemu-system-x86_64 -accel kvm -M none -nodefaults -display none -monitor stdio <<<quit >/dev/null 2>&1 \
        || { KVM_WHY="QEMU cannot open KVM"; return 1; }
}
boot_guest() { # kvm|tcg
    if [ "$1" = kvm ]; then
        ACCEL=(-accel kvm -cpu host,-arch-capabilities)
        ACCEL_NAME=KVM
        BOOT_TIMEOUT=120
    else
        ACCEL=(-accel tcg,thread=multi -cpu max)
        ACCEL_NAME="TCG ($KVM_WHY)"
        BOOT_TIMEOUT=600
    fi
    echo "QEMU accelerator: $ACCEL_NAME"
    rm -f "$work/overlay.qcow2" "$share/ready"
    qemu-img create -q -f qcow2 -F qcow2 -b "$IMAGE/base.qcow2" "$work/overlay.qcow2"
    : >"$work/serial.log"
    # ip netns exec execs QEMU: $! is QEMU's pid.
    ip netns exec "$NS" qemu-system-x86_64 -name bwvm -M q35 "${ACCEL[@]}" -smp 2 -m 1024 -nodefaults -display none \
        -kernel "$IMAGE/vmlinuz" -initrd "$IMAGE/initrd.img" \
        -append "console=ttyS0 root=/dev/vda rw net.ifnames=0 panic=-1 systemd.show_status=1" \
        -drive "file=$work/overlay.qcow2,if=virtio,format=qcow2,cache=unsafe" \
        -netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device virtio-net-pci,netdev=n0,mac=52:54:00:42:00:10 \
        -virtfs "local,path=$share,mount_tag=bwshare,security_model=none,id=bwshare" \
        -serial "file:$work/serial.log" -monitor none -no-reboot \
        >"$work/qemu.log" 2>&1 &
    QPID=$!
}
stop_qemu() {
    kill -KILL "$QPID" 2>/dev/null
    wait "$QPID" 2>/dev/null || true
    QPID=""
}
t0=$(date +%s)
if kvm_usable; then
    boot_guest kvm
    # A kernel that KVM cannot run says nothing: fall back to TCG after 30 s of silence.
    for _ in $(seq 1 150); do
        grep -q 'Linux version' "$work/serial.log" 2>/dev/null && break
        kill -0 "$QPID" 2>/dev/null || break
        sleep 0.2
    done
    if ! grep -q 'Linux version' "$work/serial.log" 2>/dev/null; then
        KVM_WHY="the kernel did not start under KVM: $(tail -c 300 "$work/qemu.log" | tr '\n' ' ')"
        stop_qemu
        boot_guest tcg
    fi
else
    boot_guest tcg
fi
for _ in $(seq 1 $((BOOT_TIMEOUT * 5))); do
    [ -e "$share/ready" ] && break
    kill -0 "$QPID" 2>/dev/null || { cat "$work/qemu.log"; tail -30 "$work/serial.log"; die "QEMU exited"; }
    sleep 0.2
done
[ -e "$share/ready" ] || { tail -40 "$work/serial.log"; die "the guest's agent did not start within $BOOT_TIMEOUT s"; }
echo "guest up in $(($(date +%s) - t0)) s"

echo 0 >"$work/gseq"
# g TIMEOUT COMMAND...: runs COMMAND in the guest (guest-lib.sh's functions at hand),
# prints its output, returns its exit status. The sequence lives in a file: g also runs
# in command substitutions (subshells).
g() {
    local t=$1 id rc seq; shift
    seq=$(($(cat "$work/gseq") + 1))
    echo "$seq" >"$work/gseq"
    id=$(printf '%05d' "$seq")
    printf '%s\n' "$*" >"$share/cmd/$id.sh.tmp"
    mv "$share/cmd/$id.sh.tmp" "$share/cmd/$id.sh"
    for _ in $(seq 1 $((t * 10))); do
        [ -e "$share/cmd/$id.rc" ] && break
        kill -0 "$QPID" 2>/dev/null || { tail -30 "$work/serial.log"; die "QEMU exited during: $*"; }
        sleep 0.1
    done
    [ -e "$share/cmd/$id.rc" ] || { cat "$share/cmd/$id.out" 2>/dev/null; tail -20 "$work/serial.log"; die "guest command timed out after $t s: $*"; }
    cat "$share/cmd/$id.out"
    rc=$(cat "$share/cmd/$id.rc")
    return "$rc"
}
g 20 "ping -c 1 -W 2 ${ADDR[1]} >/dev/null && ping -c 1 -W 2 ${ADDR[2]} >/dev/null && echo 'guest reaches n1 and n2'" \
    || die "the guest does not reach the nodes"

# --- initiator configuration, as initiator-config prints it ---
step "kernel-initiator: initiator-config applied in the guest as it is"
g 60 ki_apply_config || die "applying initiator-config failed"
CONFIG_OK=1
if ! g 30 ki_check_config; then
    CONFIG_OK=0
    fail "multipathd/iscsid rejected part of bulwark initiator-config's output (see above)"
fi

# --- login to both portals, multipath ---
step "kernel-initiator: discovery through ${ADDR[1]}, login to ${ADDR[1]} and ${ADDR[2]}"
g 120 "ki_login $IQN ${ADDR[1]} ${ADDR[1]} ${ADDR[2]}" || die "login failed"
MAP=$(g 60 "ki_multipath $IQN ${ADDR[1]} ${ADDR[2]}" | tail -1) || die "no multipath device"
echo "multipath map: $MAP"
g 30 ki_sessions || true

# Checks `multipath -ll` and the paths: two groups, the one holding the primary's path
# active with the higher priority, every path active/ready/running.
check_paths() { # primary-IP report-file
    python3 - "$1" "$2" <<'EOF'
import re, sys
primary, text = sys.argv[1], open(sys.argv[2]).read()
dev = {m.group(1): m.group(2) for m in re.finditer(r"^path (\S+) (\S+)$", text, re.M)}
groups, cur = [], None
for line in text.split("--- multipath -ll", 1)[-1].split("--- multipathd paths")[0].splitlines():
    m = re.search(r"-\+- policy='[^']*' prio=(-?\d+) status=(\w+)", line)
    if m:
        cur = {"prio": int(m.group(1)), "status": m.group(2), "paths": []}
        groups.append(cur)
        continue
    m = re.search(r"\d+:\d+:\d+:\d+ (sd\w+) \S+ (.*)$", line)
    if m and cur is not None:
        cur["paths"].append((m.group(1), m.group(2).split()))
errs = []
if len(groups) != 2:
    errs.append("%d path groups, not 2" % len(groups))
for g in groups:
    for d, st in g["paths"]:
        if st[:3] != ["active", "ready", "running"]:
            errs.append("path %s is %s" % (d, " ".join(st)))
pd = dev.get(primary)
best = [g for g in groups if any(d == pd for d, _ in g["paths"])]
if not best:
    errs.append("no group holds the primary's path %s" % pd)
elif len(groups) == 2:
    other = [g for g in groups if g is not best[0]][0]
    if not (best[0]["prio"] > other["prio"] and best[0]["status"] == "active"):
        errs.append("the primary's group (prio %d, %s) is not the active preferred one (other: prio %d, %s)"
                    % (best[0]["prio"], best[0]["status"], other["prio"], other["status"]))
if errs:
    print("; ".join(errs)); sys.exit(1)
print("2 path groups; the primary's path %s (%s) in the active group, prio %d > %d" % (
    pd, primary, best[0]["prio"], [g for g in groups if g is not best[0]][0]["prio"]))
EOF
}
# Waits until the volume is in sync and the guest's paths match its primary; sets PRIMARY.
settle() {
    local s end=$((SECONDS + KI_SETTLE_TIMEOUT)) msg=""
    s=$(wait_sync "$KI_SETTLE_TIMEOUT") || { fail "volume not back in sync within $KI_SETTLE_TIMEOUT s: $s"; return 1; }
    PRIMARY=$(field primary "$s")
    while :; do
        g 30 "ki_paths_report $IQN ${ADDR[1]} ${ADDR[2]}" >"$work/paths.txt" 2>&1 || true
        if msg=$(check_paths "${ADDR[$(idx "$PRIMARY")]}" "$work/paths.txt"); then
            echo "settled: $s; $msg"
            return 0
        fi
        [ "$SECONDS" -lt "$end" ] || break
        sleep 1
    done
    cat "$work/paths.txt"
    fail "paths not back within $KI_SETTLE_TIMEOUT s: $msg"
    return 1
}

step "kernel-initiator: ALUA through both paths"
settle || true
g 30 "ki_rtpg $IQN ${ADDR[1]} ${ADDR[2]}" >"$work/rtpg.txt" 2>&1 || true
cat "$work/rtpg.txt"
# Every path reports the primary's group (its id is the node id) active/optimized and the
# other replica's active/non-optimized: n1 and n2 as set up, unless the cluster already
# failed over on its own (said so above and here).
[ "$PRIMARY" = n1 ] || echo "NOTE: the primary is $PRIMARY, not n1, before any fault (a failover on its own; see the node logs)"
OTHER=n1
[ "$PRIMARY" = n1 ] && OTHER=n2
python3 - "$work/rtpg.txt" "$(idx "$PRIMARY")" "$(idx "$OTHER")" <<'EOF' \
    || fail "REPORT TARGET PORT GROUPS does not show $PRIMARY active/optimized and $OTHER active/non-optimized on both paths"
import re, sys
text, prim, other = open(sys.argv[1]).read(), int(sys.argv[2]), int(sys.argv[3])
names = {0: "active/optimized", 1: "active/non-optimized"}
ok = True
for block in text.split("--- rtpg ")[1:]:
    states = {}
    for m in re.finditer(r"target port group id\s*:\s*(0x[0-9a-f]+).*?asymmetric access state\s*:\s*(0x[0-9a-f]+)", block, re.S | re.I):
        states[int(m.group(1), 16)] = int(m.group(2), 16)
    name = block.split("\n", 1)[0]
    good = states.get(prim) == 0 and states.get(other) == 1
    print("rtpg via %s: group %d %s, group %d %s -> %s" % (name, prim, names.get(states.get(prim), states.get(prim)),
          other, names.get(states.get(other), states.get(other)), "ok" if good else "WRONG"))
    ok &= good
sys.exit(0 if ok and text.count("--- rtpg ") == 2 else 1)
EOF
echo "multipath -ll:"
sed -n '/--- multipath -ll/,/--- multipathd paths/p' "$work/paths.txt" | sed '1d;$d'

step "kernel-initiator: persistent reservations across the paths"
P1=${ADDR[1]}
P2=${ADDR[2]}
KEY=0x4b49
pr_check() { # what, must-match regex, guest command
    local out
    out=$(g 30 "$3" 2>&1) || true
    if grep -qiE "$2" <<<"$out"; then echo "$1: ok"; else echo "$out"; fail "$1"; fi
}
pr_check "register key $KEY through n1's path" '.' "ki_pr $IQN $P1 --out --register --param-sark=$KEY"
pr_check "key $KEY seen through n2's path" "$KEY" "ki_pr $IQN $P2 --in --read-keys"
# Under Write Exclusive - Registrants Only, n2's path writes only once registered too.
pr_check "register key $KEY through n2's path" '.' "ki_pr $IQN $P2 --out --register --param-sark=$KEY"
pr_check "reserve (Write Exclusive, registrants only) through n1's path" '.' \
    "ki_pr $IQN $P1 --out --reserve --param-rk=$KEY --prout-type=5"
pr_check "reservation seen through n2's path" "type: Write Exclusive, registrants only" \
    "ki_pr $IQN $P2 --in --read-reservation"
g 30 "ki_pr $IQN $P2 --in --read-reservation; ki_pr $IQN $P1 --in --read-keys" || true

step "kernel-initiator: ext4 on /dev/mapper/$MAP"
g 120 "ki_mkfs_mount $MAP" || die "mkfs/mount failed"
g 120 "ki_canary write" || fail "canary write failed"

# --- the cases ---
declare -A GAP LAT LIMIT LABEL
gap_of() { # case -> "gap_ms maxlat_ms writes"
    python3 - "$share/res/$1" <<'EOF'
import glob, sys
files = glob.glob(sys.argv[1] + "/dsync_lat.*.log")
if not files:
    print("nan nan 0"); sys.exit(0)
t, lat = [], []
for line in open(files[0]):
    f = [x.strip() for x in line.split(",")]
    if len(f) >= 2 and f[0].isdigit():
        t.append(int(f[0])); lat.append(int(f[1]))
t.sort()
gap = max((b - a for a, b in zip(t, t[1:])), default=0)
print(gap, round(max(lat, default=0) / 1e6), len(t))
EOF
}
# The guest's kernel and iscsid/multipathd lines of a case that say what happened.
case_log() {
    local d=$share/res/$1
    grep -hiE 'recovery timed out|conn error|requests logout|logout|Failing path|reinstat|remaining active paths|alua|switching|offlin|reset|Kernel reported|connection.*(closed|error|fail)|I/O error|queue_if_no_path|state change|transition' \
        "$d/dmesg.txt" "$d/journal.txt" 2>/dev/null | cut -c1-200 | head -${KI_LOG_LINES:-14} | sed 's/^/    /'
}
# Just before a fault: the primary must still be the one the case was set up with (a
# failover on its own under load, or a move asked by the initiator, would make the case
# measure something else), and for (a) the leader, for (b) not the leader.
pre_fault() { # case
    local s p l
    s=$(vol_state || true)
    p=$(field primary "$s")
    l=$(field leader "$s")
    echo "at the fault: $s"
    [ "$p" = "$PRIMARY" ] || fail "case ($1): the primary moved from $PRIMARY to $p on its own after the case was set up (see the node logs); the fault hits $p"
    PRIMARY=$p
    case $1 in
    a) [ "$p" = "$l" ] || fail "case (a): at the fault the primary $p is not the leader $l" ;;
    b) [ "$p" != "$l" ] || fail "case (b): at the fault the primary $p is the leader" ;;
    esac
}
# How many planned moves initiators asked for with SET TARGET PORT GROUPS, so far.
stpg_count() { cat "$work"/n*.log | grep -c 'to be active/optimized for .*: moving it there' || true; }
run_case() { # letter label limit inject-function after-function
    local c=$1 io_to=$((KI_RUNTIME + 200))
    LABEL[$c]=$2
    LIMIT[$c]=$3
    step "kernel-initiator: case ($c) ${LABEL[$c]}"
    local stpg0
    stpg0=$(stpg_count)
    g 120 "ki_start_io $c $KI_RUNTIME" || { fail "case ($c): I/O did not start"; return; }
    sleep "$KI_FAULT_AT"
    pre_fault "$c"
    echo "fault at $(date -u +%T.%3N):"
    $4
    g $((io_to + 10)) "ki_wait_io $c $io_to" || fail "case ($c): I/O jobs did not finish"
    $5
    local v d
    v=$(cat "$share/res/$c/verify.rc" 2>/dev/null || echo missing)
    d=$(cat "$share/res/$c/dsync.rc" 2>/dev/null || echo missing)
    [ "$v" = 0 ] || { grep -iE 'verify|err' "$share/res/$c/verify.txt" | head -5; fail "case ($c): fio verify job exit $v"; }
    [ "$d" = 0 ] || { grep -iE 'err' "$share/res/$c/dsync.txt" | head -5; fail "case ($c): O_DSYNC writer exit $d"; }
    # The verifying job read back what it wrote (verify_backlog, then the final pass).
    grep -qE '^ +read: IOPS=.*\(([1-9][0-9.]*[KMG]i?B)/' "$share/res/$c/verify.txt" 2>/dev/null \
        || fail "case ($c): the fio verify job read nothing back"
    read -r GAP[$c] LAT[$c] writes < <(gap_of "$c")
    echo "case ($c): $writes O_DSYNC writes; largest gap ${GAP[$c]} ms, max write latency ${LAT[$c]} ms (limit ${LIMIT[$c]} ms)"
    echo "  moves asked by the initiator (SET TARGET PORT GROUPS from Linux's scsi_dh_alua) during the case: $(($(stpg_count) - stpg0))"
    echo "  guest log:"
    case_log "$c"
    g 60 "ki_verify_again $c" >/dev/null || fail "case ($c): the verify file read back wrong after the cluster settled"
    g 60 "ki_canary check" >/dev/null || fail "case ($c): canary file damaged"
}

# (a): the primary must be the leader.
arrange() { # same|other: moves the volume so that its primary is (same) or is not (other) the leader
    local s p l r
    s=$(vol_state)
    p=$(field primary "$s"); l=$(field leader "$s"); r=$(field replicas "$s")
    if [ "$1" = same ] && [ "$p" != "$l" ]; then
        grep -qw "$l" <<<"${r//,/ }" || { fail "leader $l holds no replica; cannot arrange case"; return; }
        echo "moving $VOL to the leader $l"
        cli volume move "$VOL" "$l" >/dev/null || fail "volume move to $l failed"
    elif [ "$1" = other ] && [ "$p" = "$l" ]; then
        local to
        for to in ${r//,/ }; do [ "$to" != "$l" ] && break; done
        echo "moving $VOL off the leader $l to $to"
        cli volume move "$VOL" "$to" >/dev/null || fail "volume move to $to failed"
    fi
    settle || true
    s=$(vol_state)
    echo "before the fault: $s"
}
kill_primary() { KILLED=$PRIMARY; node_stop "$(idx "$KILLED")" KILL; echo "kill -9 $KILLED (primary)"; }
restart_killed() { node_start "$(idx "$KILLED")"; echo "restarted $KILLED"; settle || true; }
planned_move() {
    local s to
    s=$(vol_state)
    for to in $(field replicas "$s" | tr , ' '); do [ "$to" != "$PRIMARY" ] && break; done
    if ! cli volume move "$VOL" "$to" >"$work/move.txt" 2>&1; then
        # Say whether the move happened all the same (the CLI may miss a handover it made).
        fail "volume move $VOL $to failed: $(cat "$work/move.txt") [the primary is now $(field primary "$(vol_state || true)")]"
    fi
    echo "volume move $VOL $to: $(tr '\n' ' ' <"$work/move.txt")"
}
term_restart() {
    KILLED=$PRIMARY
    local t=$SECONDS
    node_stop "$(idx "$KILLED")" TERM
    node_start "$(idx "$KILLED")"
    echo "SIGTERM $KILLED (primary): exited and restarted in $((SECONDS - t)) s"
}
settle_only() { settle || true; }

arrange same
s=$(vol_state)
[ "$(field primary "$s")" = "$(field leader "$s")" ] || fail "case (a) needs the primary to be the leader: $s"
run_case a "kill -9 leader-primary" "$KI_LIMIT_A_MS" kill_primary restart_killed
arrange other
s=$(vol_state)
[ "$(field primary "$s")" != "$(field leader "$s")" ] || fail "case (b) needs a primary that is not the leader: $s"
run_case b "kill -9 non-leader primary" "$KI_LIMIT_B_MS" kill_primary restart_killed
settle || true
run_case c "planned move" "$KI_LIMIT_C_MS" planned_move settle_only
run_case d "SIGTERM primary + restart" "$KI_LIMIT_D_MS" term_restart settle_only

# --- thin provisioning (issue 21) ---
step "kernel-initiator: fstrim frees space on every replica"
settle || true
# MiB the volume's copy takes on node $1's disk.
allocated_mib() { find "$work/n$1" -name "$VOL.img" -exec stat -c %b {} + | awk '{s += $1 * 512} END {print int(s / 1048576)}'; }
TRIM_MIB=64
g 120 "ki_trim fill $TRIM_MIB" || fail "writing the file to trim failed"
declare -A ALLOC_FULL
holders=$(field replicas "$(vol_state)" | tr , ' ')
for n in $holders; do ALLOC_FULL[$n]=$(allocated_mib "$(idx "$n")"); done
g 120 "ki_trim free" || fail "fstrim failed"
for n in $holders; do
    after=$(allocated_mib "$(idx "$n")")
    echo "fstrim: the copy on $n takes $after MiB, was ${ALLOC_FULL[$n]} MiB with the $TRIM_MIB MiB file"
    # Every replica gives back most of the file (the file system's own blocks may move).
    [ $((ALLOC_FULL[$n] - after)) -ge $((TRIM_MIB * 3 / 4)) ] \
        || fail "fstrim freed $((ALLOC_FULL[$n] - after)) MiB on $n, not at least $((TRIM_MIB * 3 / 4)) of the $TRIM_MIB MiB deleted"
done

# --- the end ---
step "kernel-initiator: after the faults"
g 30 "ki_pr $IQN $P1 --in --read-keys; ki_pr $IQN $P2 --in --read-keys; ki_pr $IQN $P2 --in --read-reservation" \
    >"$work/pr-end.txt" 2>&1 || true
cat "$work/pr-end.txt"
[ "$(grep -c "$KEY" "$work/pr-end.txt")" -ge 5 ] || fail "reservation keys not all seen through both paths after the faults"
grep -qi 'registrants only' "$work/pr-end.txt" || fail "the reservation (Write Exclusive, registrants only) is gone after the faults"
g 120 "ki_finish $MAP" || fail "unmount/fsck failed"
if grep -E 'EXT4-fs error|EXT4-fs .*Aborting journal|Remounting filesystem read-only|Buffer I/O error on dev dm-|I/O error, dev dm-|blk_update_request: I/O error, dev dm-' \
    "$share/res/dmesg-all.txt"; then
    fail "I/O errors reached the file system (guest kernel log above)"
fi
for i in 1 2 3; do
    grep -q 'panicked' "$work/n$i.log" && fail "node n$i panicked (see $work/n$i.log)"
done
cp "$share/res/dmesg-all.txt" "$work/guest-dmesg.txt" 2>/dev/null || true

step "kernel-initiator: summary ($ACCEL_NAME; initiator-config accepted as is: $([ "$CONFIG_OK" = 1 ] && echo yes || echo NO))"
for c in a b c d; do
    [ -n "${GAP[$c]:-}" ] || { fail "case ($c) did not run"; continue; }
    verdict=ok
    if ! [[ "${GAP[$c]}" =~ ^[0-9]+$ ]] || [ "${GAP[$c]}" -gt "${LIMIT[$c]}" ]; then
        verdict="OVER the ${LIMIT[$c]} ms limit"
        [ "$KI_REPORT_ONLY" = 1 ] || fail "case ($c) ${LABEL[$c]}: gap ${GAP[$c]} ms over ${LIMIT[$c]} ms"
    fi
    echo "case ($c) ${LABEL[$c]}: largest application I/O gap ${GAP[$c]} ms (max write latency ${LAT[$c]} ms; limit ${LIMIT[$c]} ms: $verdict)"
done
echo "cluster: $(cat "$work"/n*.log | grep -c 'INFO failover: ' || true) unplanned failovers, $(cat "$work"/n*.log | grep -c 'planned move of .*: draining' || true) planned moves (the cases make 2 or 3 and 1 to 3; more are failovers on their own), $(cat "$work"/n*.log | grep -c 're-promotion refused' || true) re-promotions refused"
echo "host load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on this machine slows the TCG guest and the nodes; gaps are noisier under load)"
echo "run took $(($(date +%s) - START)) s"
if [ "${#FAILS[@]}" -gt 0 ]; then
    printf 'FAILED: %s\n' "${FAILS[@]}"
    exit 1
fi
[ "$KI_REPORT_ONLY" = 1 ] && echo "(KI_REPORT_ONLY=1: gaps reported, not enforced)"
echo "kernel-initiator: ok"
