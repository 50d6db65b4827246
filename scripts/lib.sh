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
