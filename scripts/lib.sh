# Shared helpers of the test scripts. Source it; it needs bash.

die() { echo "FAIL: $*" >&2; exit 1; }
step() { printf '\n=== %s\n' "$*"; }

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
APT_UPDATED=0

apt_install() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        $SUDO apt-get update -q >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "$@" >/dev/null || die "apt-get install $* failed"
}

# Installs the Debian packages the tests use when they are missing.
ensure_test_packages() {
    command -v iscsi-test-cu >/dev/null && command -v iscsi-inq >/dev/null || apt_install libiscsi-bin
    # nftables: the partition test cuts links between loopback aliases.
    command -v nft >/dev/null || apt_install nftables
    # iproute2: the virtual-IP test puts its client in a network namespace.
    command -v ip >/dev/null || apt_install iproute2
    # xfsprogs: the reflink tests (snapshots, clones) make an XFS image on a loop device.
    command -v mkfs.xfs >/dev/null || apt_install xfsprogs
    # The observability test: promtool and a real Prometheus, headless Chromium driven
    # through chromedriver, curl.
    command -v promtool >/dev/null && command -v prometheus >/dev/null || apt_install prometheus
    command -v chromium >/dev/null && command -v chromedriver >/dev/null || apt_install chromium chromium-driver
    command -v curl >/dev/null || apt_install curl
    # The package test: cargo-deb's dpkg-shlibdeps, strip/objcopy, systemd-analyze.
    command -v dpkg-shlibdeps >/dev/null || apt_install dpkg-dev
    command -v objcopy >/dev/null || apt_install binutils
    command -v systemd-analyze >/dev/null || apt_install systemd
    # QEMU's iSCSI driver lives in qemu-block-extra, which must match qemu-utils exactly.
    local want have
    have=$(dpkg-query -W -f='${Version}' qemu-block-extra 2>/dev/null || true)
    if [ -z "$have" ] || [ "$have" != "$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)" ]; then
        [ "$APT_UPDATED" -eq 1 ] || { $SUDO apt-get update -q >/dev/null; APT_UPDATED=1; }
        want=$(apt-cache policy qemu-block-extra | awk '/Candidate/{print $2}')
        [ -n "$want" ] && [ "$want" != "(none)" ] || die "no qemu-block-extra package available"
        apt_install --allow-downgrades "qemu-block-extra=$want" "qemu-utils=$want"
    fi
    command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || die "qemu-img/qemu-io missing after install"
}

# Starts bulwark with a config; sets BULWARK_PID. Logs go to $1.log.
BULWARK_BIN=${BULWARK_BIN:-target/debug/bulwark}
start_bulwark() {
    local config=$1 log=$2
    "$BULWARK_BIN" serve --config "$config" >"$log" 2>&1 &
    BULWARK_PID=$!
    for _ in $(seq 1 100); do
        grep -q '^Ready' "$log" 2>/dev/null && return 0
        kill -0 "$BULWARK_PID" 2>/dev/null || { cat "$log"; die "bulwark exited at start"; }
        sleep 0.1
    done
    cat "$log"; die "bulwark did not become ready"
}

stop_bulwark() {
    if [ -n "${BULWARK_PID:-}" ] && kill -0 "$BULWARK_PID" 2>/dev/null; then
        kill -TERM "$BULWARK_PID"
        for _ in $(seq 1 100); do kill -0 "$BULWARK_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$BULWARK_PID" 2>/dev/null && { kill -KILL "$BULWARK_PID"; die "bulwark did not stop on SIGTERM"; }
        wait "$BULWARK_PID" 2>/dev/null || true
    fi
    BULWARK_PID=""
}

# Every test of `iscsi-test-cu -t ALL`, with Sanitize.Reset as its own suite instance
# (see scripts/e2e/conformance.sh for why).
CONFORMANCE_ALL='ALL.[!S]*,ALL.S[!a]*,ALL.Sanitize.[!R]*,ALL.Sanitize.Readonly,ALL.Sanitize.Reservations,ALL.Sanitize.Reset'
all_test_count() { iscsi-test-cu -l | grep -c '^ALL\.[^.]*\.'; }

# Checks an iscsi-test-cu output: 0 failed, and no skip other than for removable
# media, write protection, SANITIZE CRYPTO ERASE, or the pattern given as $3.
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
    bad_skips=$(grep -F '[SKIPPED]' "$out" | grep -v -e 'not removable' -e 'not write-protected' \
        -e 'SANITIZE CRYPTO_ERASE is not implemented' -e "${3:-no other allowed skip}" || true)
    if [ -n "$bad_skips" ]; then
        echo "$bad_skips"
        die "$name: tests skipped for a reason other than removable media or write protection"
    fi
    echo "$name: $ran tests ran, 0 failed, no skips but the allowed ones"
}

# Starts `bulwark demo` (3 nodes on 127.0.0.1-3) with its data under $1; sets DEMO_PID,
# DEMO_OUT and exports BULWARK_NODE and BULWARK_TOKEN for the CLI. stop_demo undoes it.
start_demo() {
    DEMO_OUT=$1/demo.out
    "$BULWARK_BIN" demo --no-watch --dir "$1/data" >"$DEMO_OUT" 2>&1 &
    DEMO_PID=$!
    for _ in $(seq 1 600); do
        grep -q '^demo ready' "$DEMO_OUT" && break
        kill -0 "$DEMO_PID" 2>/dev/null || { cat "$DEMO_OUT"; die "bulwark demo exited early"; }
        sleep 0.1
    done
    grep -q '^demo ready' "$DEMO_OUT" || { cat "$DEMO_OUT"; die "bulwark demo not ready within 60 s"; }
    export BULWARK_NODE=127.0.0.2:3261
    BULWARK_TOKEN=$(sed -n 's/^token: //p' "$DEMO_OUT")
    export BULWARK_TOKEN
}

# The node pids the demo printed.
demo_node_pids() { sed -n 's/^  n[0-9]: pid \([0-9]*\) .*/\1/p' "$DEMO_OUT" 2>/dev/null; }

# Pins every thread of the demo's node NAME (n1, n2, ...) to CPU.
pin_demo_node() { # name cpu
    local pid
    pid=$(sed -n "s/^  $1: pid \([0-9]*\) .*/\1/p" "$DEMO_OUT")
    [ -n "$pid" ] || die "no pid for demo node $1"
    taskset -apc "$2" "$pid" >/dev/null
}

# Stops the demo as Ctrl-C does (it stops its nodes), then kills whatever still runs
# of it and of the nodes it started (by pid).
stop_demo() {
    if [ -n "${DEMO_PID:-}" ] && kill -0 "$DEMO_PID" 2>/dev/null; then
        kill -INT "$DEMO_PID"
        for _ in $(seq 1 150); do kill -0 "$DEMO_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$DEMO_PID" 2>/dev/null && kill -KILL "$DEMO_PID"
        wait "$DEMO_PID" 2>/dev/null || true
    fi
    for p in $(demo_node_pids); do
        kill -0 "$p" 2>/dev/null && kill -KILL "$p"
    done
    DEMO_PID=""
}

# Installs the Debian packages the kernel-initiator harness (scripts/e2e/kernel-initiator.sh)
# needs on the host when they are missing: QEMU with KVM/TCG and virtio-9p, mmdebstrap to
# build the guest image, e2fsprogs (mkfs.ext4 -d) and qemu-img for the image, iproute2
# for the network namespace, python3 for the JSON and latency figures.
ensure_vm_packages() {
    command -v qemu-system-x86_64 >/dev/null || apt_install qemu-system-x86
    command -v mmdebstrap >/dev/null || apt_install mmdebstrap
    command -v mkfs.ext4 >/dev/null || apt_install e2fsprogs
    command -v qemu-img >/dev/null || apt_install qemu-utils
    command -v ip >/dev/null || apt_install iproute2
    command -v python3 >/dev/null || apt_install python3
    # mmdebstrap checks the archive's signatures with these keys.
    [ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || apt_install debian-archive-keyring
}

# --- Benchmarks (scripts/bench*) ---

# Installs what the benchmark scripts measure the machine with.
ensure_bench_packages() {
    command -v iperf3 >/dev/null || apt_install iperf3
    command -v fio >/dev/null || apt_install fio
    command -v bc >/dev/null || apt_install bc
    command -v gcc >/dev/null || apt_install gcc
}

# CPU seconds every core of the machine spent busy so far (/proc/stat: all but idle and
# iowait), whoever used them: the nodes, the client and the kernel's network work.
machine_busy_seconds() {
    awk '/^cpu / {printf "%.2f\n", ($2 + $3 + $4 + $7 + $8 + $9) / '"$(getconf CLK_TCK)"'}' /proc/stat
}

# CPU seconds (user + system, every thread) the processes $@ used so far, summed.
cpu_seconds() {
    local p ticks=0
    for p in "$@"; do
        [ -r "/proc/$p/stat" ] || continue
        # After "pid (comm) " utime and stime are the 12th and 13th fields.
        ticks=$((ticks + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
    done
    echo "$ticks / $(getconf CLK_TCK)" | bc -l
}

# The machine's limits, measured now: loopback TCP, one stream (iperf3, MB/s), and the
# disk under $1 with fio, direct I/O (4 KiB random reads and writes at depth 32, IOPS;
# 1 MiB writes at depth 16, MB/s). Sets LIMIT_TCP_MBS, LIMIT_RR_IOPS, LIMIT_RW_IOPS,
# LIMIT_W1M_MBS and prints them.
machine_limits() {
    local dir=$1 port=5399 srv
    iperf3 -s -1 -B 127.0.0.1 -p "$port" >/dev/null 2>&1 &
    srv=$!
    sleep 0.5
    LIMIT_TCP_MBS=$(timeout 30 iperf3 -c 127.0.0.1 -p "$port" -t 5 -J |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 8e6)')
    wait "$srv" 2>/dev/null || true
    LIMIT_RR_IOPS=$(disk_figure "$dir" randread 4k 32 iops read)
    LIMIT_RW_IOPS=$(disk_figure "$dir" randwrite 4k 32 iops write)
    LIMIT_W1M_MBS=$(disk_figure "$dir" write 1M 16 mbs write)
    printf '\nthe machine: loopback TCP, 1 stream %.0f MB/s; disk (fio, %s, direct): 4 KiB random read QD32 %.0f IOPS, 4 KiB random write QD32 %.0f IOPS, 1 MiB write QD16 %.0f MB/s\n' \
        "$LIMIT_TCP_MBS" "$(fio_engine "$dir")" "$LIMIT_RR_IOPS" "$LIMIT_RW_IOPS" "$LIMIT_W1M_MBS"
}

# The fio engine for direct I/O under $1: io_uring where the kernel allows it.
fio_engine() {
    if fio --name=probe --filename="$1/fio-probe.img" --size=64M --direct=1 --ioengine=io_uring \
        --rw=read --bs=4k --runtime=1 --output=/dev/null >/dev/null 2>&1; then
        echo io_uring
    else
        echo libaio
    fi
    rm -f "$1/fio-probe.img"
}

# One figure of the disk under $1, with fio and direct I/O for 8 s on a 2 GiB file:
# disk_figure DIR rw bs depth iops|mbs read|write.
disk_figure() {
    local dir=$1
    timeout 60 fio --name=limit --filename="$dir/fio.img" --size=2G --direct=1 --ioengine="$(fio_engine "$dir")" \
        --rw="$2" --bs="$3" --iodepth="$4" --runtime=8 --time_based --output-format=json |
        python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]['$6']; print(j['iops'] if '$5' == 'iops' else j['bw_bytes'] / 1e6)"
    rm -f "$dir/fio.img"
}

# The median round trip of a 4 KiB message and an 8-byte answer over loopback TCP
# from 127.0.0.1 to 127.0.0.2 (what a replicated 4 KiB write adds at depth 1), in µs.
# Python sockets: the interpreter adds a few µs of its own, so it errs on the long side.
tcp_round_trip_us() {
    python3 - <<'PY'
import socket, statistics, threading, time
srv = socket.socket(); srv.bind(("127.0.0.2", 0)); srv.listen(1)
def echo():
    c, _ = srv.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        got = 0
        while got < 4096:
            b = c.recv(4096 - got)
            if not b: return
            got += len(b)
        c.sendall(b"\0" * 8)
threading.Thread(target=echo, daemon=True).start()
s = socket.create_connection(srv.getsockname(), source_address=("127.0.0.1", 0))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg, times = b"x" * 4096, []
for i in range(3000):
    t = time.perf_counter(); s.sendall(msg)
    got = 0
    while got < 8: got += len(s.recv(8 - got))
    if i >= 500: times.append(time.perf_counter() - t)
print(round(statistics.median(times) * 1e6, 1))
PY
}
