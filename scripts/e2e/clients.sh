#!/usr/bin/env bash
# Real initiators against Bulwark: libiscsi's iscsi-ls / iscsi-inq and QEMU's iSCSI
# driver (qemu-img info / convert / bench, qemu-io), with data verified end to end.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

step "clients: iscsi-ls, iscsi-inq, qemu-img, qemu-io"
work=$(mktemp -d /tmp/bulwark-clients.XXXXXX)
trap 'stop_bulwark; rm -rf "$work"' EXIT
iqn=iqn.2026-11.io.bulwark:clients
cat >"$work/bulwark.toml" <<TOML
[[target]]
iqn = "$iqn"
portals = ["127.0.0.1:3260"]
[[target.lun]]
lun = 0
path = "$work/lun0.img"
size = "64MiB"
[[target.lun]]
lun = 1
path = "$work/lun1.img"
size = "32MiB"
block_size = 4096
TOML
start_bulwark "$work/bulwark.toml" "$work/bulwark.log"
url="iscsi://127.0.0.1/$iqn"

iscsi-ls -s iscsi://127.0.0.1 >"$work/ls.txt"
grep -q "Lun:0.*DIRECT_ACCESS" "$work/ls.txt" || { cat "$work/ls.txt"; die "iscsi-ls does not show LUN 0"; }
grep -q "Lun:1.*DIRECT_ACCESS" "$work/ls.txt" || { cat "$work/ls.txt"; die "iscsi-ls does not show LUN 1"; }
echo "iscsi-ls: both LUNs listed"
iscsi-inq "$url/0" | grep -q "Vendor:BULWARK" || die "iscsi-inq: wrong vendor"
iscsi-inq -e 1 -c 0x80 "$url/0" | grep -qi "serial" || die "iscsi-inq: no unit serial number page"
echo "iscsi-inq: standard and VPD inquiry"

qemu-img info "$url/0" >"$work/info.txt"
grep -q "virtual size: 64 MiB" "$work/info.txt" || { cat "$work/info.txt"; die "qemu-img info: wrong size"; }
echo "qemu-img info: 64 MiB"

head -c $((8 << 20)) /dev/urandom >"$work/src.raw"
for lun in 0 1; do
    qemu-img convert -n -f raw -O raw "$work/src.raw" "$url/$lun"
    qemu-img convert -f raw -O raw "$url/$lun" "$work/back.raw"
    cmp -n $((8 << 20)) "$work/src.raw" "$work/back.raw" || die "qemu-img convert: LUN $lun data differs after a round trip"
done
echo "qemu-img convert: 8 MiB round trip identical on 512- and 4096-byte LUNs"

qemu-io -f raw -c "write -P 0x5a 1M 256k" -c "read -P 0x5a 1M 256k" -c "aio_write -P 0x33 4M 64k" -c "aio_flush" -c "read -P 0x33 4M 64k" -c "discard 8M 1M" -c "read -P 0 8M 1M" "$url/0" >"$work/io.txt"
if grep -qiE "fail|error|Pattern verification" "$work/io.txt"; then cat "$work/io.txt"; die "qemu-io reported an error"; fi
echo "qemu-io: write/read/aio/flush/discard verified"

qemu-img bench -f raw -t none -n -w -c 2000 -d 32 -s 4k "$url/0" >"$work/bench.txt" 2>&1 || { cat "$work/bench.txt"; die "qemu-img bench (write) failed"; }
qemu-img bench -f raw -t none -n -c 2000 -d 32 -s 4k "$url/0" >>"$work/bench.txt" 2>&1 || { cat "$work/bench.txt"; die "qemu-img bench (read) failed"; }
echo "qemu-img bench: 4 KiB writes and reads at depth 32 completed"

if grep -E 'panicked' "$work/bulwark.log"; then die "bulwark panicked"; fi

# SIGTERM with a session open: the initiator is asked to log out, the server stops, and
# what was acknowledged is in the backing file.
qemu-io -f raw -c "write -P 0x7e 2M 64k" "$url/0" >/dev/null
stop_bulwark
grep -q "shutting down" "$work/bulwark.log" || die "no shutdown message on SIGTERM"
grep -q "stopped" "$work/bulwark.log" || die "server did not report a clean stop"
python3 - "$work/lun0.img" <<'PY' || die "acknowledged write missing from the backing file after SIGTERM"
import sys
with open(sys.argv[1], "rb") as f:
    f.seek(2 << 20)
    sys.exit(0 if f.read(65536) == b"\x7e" * 65536 else 1)
PY
echo "SIGTERM: clean stop, acknowledged data in the backing file"
echo "clients: all passed"
