#!/usr/bin/env bash
# Builds (once) the Debian 12 guest image of the kernel-initiator harness and prints
# the folder that holds it: base.qcow2 (ext4 root file system, no partition table, for
# root=/dev/vda), vmlinuz and initrd.img (for QEMU's direct kernel boot).
#
# The image is cached under $BWVM_CACHE (default /var/cache/bulwark-vm)/<hash>, where
# the hash covers this script and scripts/vm/packages: it is rebuilt only when one of
# them changes, and older hashes are removed. The build runs in a temporary folder next
# to the cache and is renamed into place at the end, so an interrupted build leaves no
# half image behind. A lock keeps two builds from running at once.
#
# The guest runs nothing of the harness itself: at boot, bwvm-agent.service mounts the
# 9p share "bwshare" on /share and runs /share/agent.sh (scripts/vm/guest-agent.sh),
# so the harness's guest-side logic changes without a rebuild.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
. scripts/lib.sh

cache=${BWVM_CACHE:-/var/cache/bulwark-vm}
mirror=${BWVM_MIRROR:-http://deb.debian.org/debian}
hash=$(cat "$here/build-image.sh" "$here/packages" | sha256sum | cut -c1-16)
out=$cache/$hash

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock -w 1800 9 || die "another image build holds $cache/.lock"

if [ -e "$out/complete" ]; then
    echo "$out"
    exit 0
fi

ensure_vm_packages
step "kernel-initiator: building the Debian 12 guest image ($hash) in $cache" >&2
start=$(date +%s)
tmp=$(mktemp -d "$cache/.build-$hash.XXXXXX")
# Leaves nothing behind on failure (a mount of the chroot's /proc, etc. is mmdebstrap's).
trap 'rm -rf "$tmp"' EXIT

pkgs=$(grep -v -e '^#' -e '^\s*$' "$here/packages" | paste -sd, -)
root=$tmp/root

# The guest's own files, written into the root by the customize hook below.
cat >"$tmp/bwvm-agent.service" <<'UNIT'
[Unit]
Description=Bulwark harness agent (runs /share/agent.sh from the host's 9p share)
After=local-fs.target systemd-udevd.service
DefaultDependencies=yes

[Service]
Type=simple
ExecStartPre=/bin/mkdir -p /share
ExecStartPre=/bin/mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 bwshare /share
ExecStart=/bin/bash /share/agent.sh
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
UNIT

# Apt without recommends: a small, predictable image.
mmdebstrap --variant=minbase --include="$pkgs" \
    --aptopt='APT::Install-Recommends "false"' \
    --customize-hook='echo bwvm >"$1/etc/hostname"' \
    --customize-hook='printf "/dev/vda / ext4 rw,errors=remount-ro 0 1\n" >"$1/etc/fstab"' \
    --customize-hook='chroot "$1" passwd -d root' \
    --customize-hook="cp '$tmp/bwvm-agent.service' \"\$1/etc/systemd/system/\"" \
    --customize-hook='chroot "$1" systemctl enable bwvm-agent.service' \
    --customize-hook='chroot "$1" systemctl enable serial-getty@ttyS0.service' \
    --customize-hook='printf "virtio_pci\nvirtio_blk\nvirtio_net\next4\n9p\n9pnet_virtio\n" >>"$1/etc/initramfs-tools/modules"' \
    --customize-hook='chroot "$1" update-initramfs -u -k all' \
    --customize-hook='rm -f "$1"/etc/iscsi/initiatorname.iscsi; rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
    bookworm "$root" "$mirror" >"$tmp/mmdebstrap.log" 2>&1 \
    || { tail -40 "$tmp/mmdebstrap.log" >&2; die "mmdebstrap failed (log above)"; }

kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -1)
[ -s "$kernel" ] && [ -s "$initrd" ] || die "no kernel or initrd in the image"
cp "$kernel" "$tmp/vmlinuz"
cp "$initrd" "$tmp/initrd.img"
basename "$kernel" | sed 's/^vmlinuz-//' >"$tmp/kernel-version"

# An ext4 file system filled from the folder (no loop device, no mount), 3 GiB sparse.
mkfs.ext4 -q -F -L bwroot -d "$root" "$tmp/root.raw" 3G >&2 || die "mkfs.ext4 -d failed"
qemu-img convert -q -f raw -O qcow2 "$tmp/root.raw" "$tmp/base.qcow2"
rm -rf "$root" "$tmp/root.raw"
printf '%s\n' "$pkgs" >"$tmp/packages"
date -u +%FT%TZ >"$tmp/complete"

# Into place; older images go.
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
for old in "$cache"/*/ "$cache"/.build-*; do
    [ -e "$old" ] || continue
    case "$old" in "$out"/ | "$out") continue ;; esac
    # Only our own: a folder named by a hash, or a build left over by a dead run.
    if [ -e "$old/complete" ] || [[ "$(basename "$old")" == .build-* ]]; then
        rm -rf "$old"
    fi
done
echo "kernel-initiator: image built in $(($(date +%s) - start)) s ($(du -sh "$out" | cut -f1))" >&2
echo "$out"
