# Guest-side functions of the kernel-initiator harness, sourced by the guest agent
# (scripts/vm/guest-agent.sh) before each command the host sends. Runs inside the
# Debian 12 guest as root: open-iscsi, dm-multipath, sg3-utils, fio, e2fsprogs.
# Each function prints what the host needs and fails (non-zero) with a message.

S=/share
R=/root/results
MNT=/mnt/bw
mkdir -p "$R" "$S/res"

gfail() { echo "GUEST FAIL: $*"; exit 1; }

# Runs CMD until it succeeds, for at most SECS seconds: wait_for SECS CMD...
wait_for() {
    local secs=$1; shift
    local end=$((SECONDS + secs))
    while ! "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$end" ] || return 1
        sleep 0.2
    done
}

MP_SECTIONS='^[[:space:]]*(defaults|devices|blacklist|blacklist_exceptions|multipaths|overrides)[[:space:]]*\{'

# Applies `bulwark initiator-config`'s output (/share/initiator-config.txt) as it is:
# its "key = value" lines replace the same keys in /etc/iscsi/iscsid.conf (or are
# appended), its "options MODULE ..." lines become /etc/modprobe.d/bulwark.conf and are
# set at once in /sys/module (before any login: scsi_dh_alua reads them when it attaches
# a device), and everything from its first multipath.conf section on becomes
# /etc/multipath.conf. Then restarts iscsid and multipathd with it.
ki_apply_config() {
    local cfg=$S/initiator-config.txt line key
    [ -s "$cfg" ] || gfail "no $cfg"
    awk -v re="$MP_SECTIONS" '$0 ~ re {mp=1} !mp && /^[[:space:]]*[A-Za-z][A-Za-z0-9_.\[\]]*[[:space:]]*=/' "$cfg" >"$R/iscsid.values"
    awk -v re="$MP_SECTIONS" '$0 ~ re {mp=1} mp' "$cfg" >"$R/multipath.conf"
    [ -s "$R/iscsid.values" ] || gfail "initiator-config has no iscsid.conf values"
    [ -s "$R/multipath.conf" ] || gfail "initiator-config has no multipath.conf section"
    [ -e "$R/iscsid.conf.orig" ] || cp /etc/iscsi/iscsid.conf "$R/iscsid.conf.orig"
    cp "$R/iscsid.conf.orig" /etc/iscsi/iscsid.conf
    echo "# --- from bulwark initiator-config (kernel-initiator harness)" >>/etc/iscsi/iscsid.conf
    while IFS= read -r line; do
        key=$(printf '%s\n' "$line" | sed 's/^[[:space:]]*//; s/[[:space:]]*=.*//')
        awk -v k="$key" '{ l = $0; sub(/^[ \t]*/, "", l); split(l, a, /[ \t]*=/); if (a[1] == k) next; print }' \
            /etc/iscsi/iscsid.conf >"$R/iscsid.conf.new"
        cat "$R/iscsid.conf.new" >/etc/iscsi/iscsid.conf
        printf '%s\n' "$line" >>/etc/iscsi/iscsid.conf
    done <"$R/iscsid.values"
    cp "$R/multipath.conf" /etc/multipath.conf
    awk -v re="$MP_SECTIONS" '$0 ~ re {mp=1} !mp && /^options[[:space:]]/' "$cfg" >/etc/modprobe.d/bulwark.conf
    local module param
    while read -r _ module rest; do
        modprobe "$module" || gfail "modprobe $module failed"
        for param in $rest; do
            [ -w "/sys/module/$module/parameters/${param%%=*}" ] || gfail "$module has no writable parameter ${param%%=*}"
            echo "${param#*=}" >"/sys/module/$module/parameters/${param%%=*}" || gfail "cannot set $module ${param%%=*}"
            echo "module $module: ${param%%=*} = $(cat "/sys/module/$module/parameters/${param%%=*}")"
        done
    done </etc/modprobe.d/bulwark.conf
    echo "InitiatorName=iqn.2026-11.io.bulwark.test:kernel-initiator" >/etc/iscsi/initiatorname.iscsi
    date +%s >"$R/config-applied-at"
    systemctl restart iscsid.service || gfail "iscsid did not restart"
    systemctl restart multipathd.service || gfail "multipathd did not restart"
    wait_for 20 multipathd show status || gfail "multipathd does not answer"
    echo "iscsid.conf values applied:"
    sed 's/^/  /' "$R/iscsid.values"
    echo "multipath.conf: $(wc -l <"$R/multipath.conf") lines"
}

# Fails when multipath or multipathd rejects a line of /etc/multipath.conf, or iscsid a
# line of iscsid.conf: `multipath -t` (which parses the file), multipathd's and
# iscsid's journal since the restart. Prints every complaint.
ki_check_config() {
    local since bad=0
    since=$(cat "$R/config-applied-at")
    multipath -t >"$R/multipath-t.txt" 2>"$R/multipath-t.err" || true
    multipathd show config >"$R/multipathd-config.txt" 2>&1 || true
    journalctl -b --since "@$since" -u multipathd -u iscsid -o cat >"$R/config-journal.txt" 2>&1 || true
    if grep -hiE 'invalid|unknown|ignor|error|deprecated' "$R/multipath-t.err" "$R/config-journal.txt" \
        | grep -v -e 'Starting' -e 'Started' >"$R/config-complaints.txt"; then
        echo "complaints about the initiator configuration:"
        sed 's/^/  /' "$R/config-complaints.txt"
        bad=1
    fi
    grep -q 'vendor "BULWARK"' "$R/multipathd-config.txt" || { echo "multipathd show config has no BULWARK device section"; bad=1; }
    echo "multipathd find_multipaths: $(awk '/^defaults/{d=1} d && /find_multipaths /{print $2; exit}' "$R/multipathd-config.txt")"
    [ "$bad" -eq 0 ]
}

# Discovery through $2 (one portal), then a login to each of the portals given after
# it. Checks that every iscsid.conf value of initiator-config is in each node record.
ki_login() {
    local iqn=$1 disc=$2 p key val got; shift 2
    iscsiadm -m discovery -t sendtargets -p "$disc" | tee "$R/discovery.txt" || gfail "discovery through $disc failed"
    for p in "$@"; do
        grep -q "^$p:3260,[0-9]* $iqn\$" "$R/discovery.txt" || gfail "discovery through $disc does not list $p"
    done
    for p in "$@"; do
        iscsiadm -m node -T "$iqn" -p "$p" >"$R/node-$p.txt" || gfail "no node record for $p"
        while IFS= read -r line; do
            key=$(printf '%s\n' "$line" | sed 's/^[[:space:]]*//; s/[[:space:]]*=.*//')
            val=$(printf '%s\n' "$line" | sed 's/^[^=]*=[[:space:]]*//; s/[[:space:]]*$//')
            got=$(awk -v k="$key" -F' = ' '$1 == k {print $2}' "$R/node-$p.txt")
            [ "$got" = "$val" ] || gfail "node record for $p: $key is '$got', initiator-config says '$val'"
        done <"$R/iscsid.values"
        iscsiadm -m node -T "$iqn" -p "$p" --login || gfail "login to $p failed"
    done
    for p in "$@"; do
        wait_for 30 test -e "/dev/disk/by-path/ip-$p:3260-iscsi-$iqn-lun-0" || gfail "no disk for $p after login"
    done
    echo "node records hold initiator-config's values; logged in to $*"
}

# The path device (sdX) of portal $2 for target $1.
ki_dev() { basename "$(readlink -f "/dev/disk/by-path/ip-$2:3260-iscsi-$1-lun-0")"; }

# Lets dm-multipath take the two paths (adds the WWID when find_multipaths needs it)
# and waits for the map. Prints its name.
ki_multipath() {
    local iqn=$1 p dev; shift
    for p in "$@"; do
        dev=$(ki_dev "$iqn" "$p")
        multipath -a "/dev/$dev" >/dev/null 2>&1 || true
    done
    multipath >/dev/null 2>&1 || true
    wait_for 30 ki_map_name || gfail "no multipath map"
    ki_map_name
}
ki_map_name() { local n; n=$(dmsetup ls --target multipath | awk 'NR==1{print $1}'); [ -n "$n" ] && [ "$n" != "No" ] && echo "$n"; }

# What the host checks: each portal's path device, `multipath -ll`, paths' states.
ki_paths_report() {
    local iqn=$1 p; shift
    for p in "$@"; do echo "path $p $(ki_dev "$iqn" "$p")"; done
    echo "--- multipath -ll"
    multipath -ll 2>/dev/null
    echo "--- multipathd paths"
    multipathd show paths raw format "%d %t %T %o %p" 2>/dev/null
}

# REPORT TARGET PORT GROUPS through each portal's path.
ki_rtpg() {
    local iqn=$1 p; shift
    for p in "$@"; do
        echo "--- rtpg $p $(ki_dev "$iqn" "$p")"
        sg_rtpg -d "/dev/$(ki_dev "$iqn" "$p")" || echo "sg_rtpg failed"
    done
}

# sg_persist through a portal's path: ki_pr IQN PORTAL ARGS...
ki_pr() { local iqn=$1 p=$2; shift 2; sg_persist "$@" "/dev/$(ki_dev "$iqn" "$p")"; }

ki_mkfs_mount() {
    local dev=/dev/mapper/$1
    mkfs.ext4 -q -F "$dev" || gfail "mkfs.ext4 on $dev failed"
    mkdir -p "$MNT"
    mount -o noatime "$dev" "$MNT" || gfail "mount $dev failed"
    df -h "$MNT" | tail -1
}

# Thin provisioning: ki_trim fill N writes an N MiB file of random data and syncs it;
# ki_trim free removes it and runs fstrim, which sends UNMAP for the freed blocks
# (the host compares the volume's allocation on every replica before and after).
ki_trim() {
    case $1 in
    fill)
        lsblk -D "$(findmnt -n -o SOURCE "$MNT")" | sed 's/^/    /'
        dd if=/dev/urandom of="$MNT/trim.dat" bs=1M count="$2" oflag=direct status=none \
            || gfail "writing $MNT/trim.dat failed"
        sync
        ;;
    free)
        rm -f "$MNT/trim.dat"
        sync
        fstrim -v "$MNT" || gfail "fstrim $MNT failed"
        ;;
    esac
}

# The canary: 16 MiB written once with checksums, read back after every fault.
ki_canary() {
    local mode=$1
    case $mode in
    write) fio --name=canary --filename="$MNT/canary.dat" --size=16M --rw=write --bs=64k --ioengine=psync \
        --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --output="$R/canary-write.txt" ;;
    check) fio --name=canary --filename="$MNT/canary.dat" --size=16M --rw=write --bs=64k --ioengine=psync \
        --direct=1 --verify=crc32c --verify_only --verify_fatal=1 --output="$R/canary-check.txt" ;;
    esac || { cat "$R/canary-$mode.txt"; gfail "canary $mode failed"; }
    grep -E 'err=|verify' "$R/canary-$mode.txt" | head -3
}

# The verifying job of a case: 4 MiB of random 4 KiB writes at 100 a second (about 10 s,
# plus whatever the fault stalls), each block with a crc32c header, then every block
# read back and checked. (Not time_based and no verify_backlog: fio 3.33 skips the
# final verify of a time_based job, and --verify_only ignores a verify_backlog job's blocks.)
VERIFY_JOB="--name=verify --size=4M --rw=randwrite --bs=4k --ioengine=libaio --iodepth=4 --direct=1"
VERIFY_JOB+=" --verify=crc32c --do_verify=1 --verify_fatal=1 --rate_iops=100"

# Starts the two I/O jobs of a case in the background: the verifying writer above and
# an O_DSYNC 4 KiB writer at depth 1 whose every completion is logged (write_lat_log,
# log_avg_msec=0) for the gap. ki_start_io CASE RUNTIME_S
ki_start_io() {
    local c=$1 rt=$2 d=$R/$1
    rm -rf "$d"; mkdir -p "$d"
    rm -f "$MNT"/verify-*.dat "$MNT"/dsync-*.dat
    # Lay the files out first, so the fault window is all steady-state writes.
    fio --name=layout --filename="$MNT/verify-$c.dat" --size=4M --rw=write --bs=1M --direct=1 --output=/dev/null || gfail "layout"
    fio --name=layout --filename="$MNT/dsync-$c.dat" --size=4M --rw=write --bs=1M --direct=1 --output=/dev/null || gfail "layout"
    dmesg | wc -l >"$d/dmesg-start"
    date +%s >"$d/start"
    # shellcheck disable=SC2086
    setsid bash -c "fio $VERIFY_JOB --filename=$MNT/verify-$c.dat --output=$d/verify.txt; echo \$? >$d/verify.rc" \
        </dev/null >/dev/null 2>&1 &
    setsid bash -c "fio --name=dsync --filename=$MNT/dsync-$c.dat --size=4M --rw=write --bs=4k \
        --ioengine=psync --iodepth=1 --direct=1 --sync=1 --time_based --runtime=$rt \
        --write_lat_log=$d/dsync --log_avg_msec=0 --output=$d/dsync.txt; echo \$? >$d/dsync.rc" \
        </dev/null >/dev/null 2>&1 &
    sleep 1
    echo "case $c: I/O started for ${rt} s"
}

# Reads a case's verify file back once more, after the cluster settled (same job, same
# seed: the same blocks with the same expected contents).
ki_verify_again() {
    local c=$1
    # shellcheck disable=SC2086
    fio $VERIFY_JOB --filename="$MNT/verify-$c.dat" --verify_only --output="$R/$c/verify-again.txt" \
        || { grep -iE 'bad|verify|err' "$R/$c/verify-again.txt" | head -5; gfail "case $c: verify after settling failed"; }
    cp "$R/$c/verify-again.txt" "$S/res/$c/"
    grep -E 'read:' "$R/$c/verify-again.txt"
}

# Waits for both jobs of a case, then copies the results to /share/res/CASE (with the
# kernel log and the iscsid/multipathd journal of the case).
ki_wait_io() {
    local c=$1 secs=$2 d=$R/$1
    wait_for "$secs" test -e "$d/verify.rc" -a -e "$d/dsync.rc" || gfail "case $c: I/O still running after $secs s"
    dmesg -T | tail -n +"$(($(cat "$d/dmesg-start") + 1))" >"$d/dmesg.txt"
    journalctl -b --since "@$(cat "$d/start")" -u iscsid -u multipathd -o short-precise >"$d/journal.txt" 2>&1 || true
    mkdir -p "$S/res/$c"
    cp -r "$d"/. "$S/res/$c/"
    echo "case $c: verify job exit $(cat "$d/verify.rc"), dsync job exit $(cat "$d/dsync.rc")"
}

# The end: unmount, fsck, and what the kernel logged about errors above the paths.
ki_finish() {
    local name=$1
    umount "$MNT" || gfail "umount failed"
    fsck.ext4 -fn "/dev/mapper/$name" >"$R/fsck.txt" 2>&1
    local rc=$?
    cat "$R/fsck.txt"
    echo "fsck exit $rc"
    dmesg -T >"$S/res/dmesg-all.txt"
    journalctl -b -o short-precise >"$S/res/journal-all.txt" 2>&1 || true
    [ "$rc" -eq 0 ] || gfail "fsck.ext4 -fn found problems (exit $rc)"
}

# Each iSCSI session's portal and its recovery timeout as the kernel holds it (dm-multipath
# sets it from fast_io_fail_tmo, over iscsid.conf's replacement_timeout).
ki_sessions() {
    local s
    for s in /sys/class/iscsi_session/session*; do
        echo "$(basename "$s"): $(cat "$s"/device/connection*/iscsi_connection/connection*/persistent_address 2>/dev/null):$(cat "$s"/device/connection*/iscsi_connection/connection*/persistent_port 2>/dev/null) recovery_tmo=$(cat "$s/recovery_tmo") s"
    done
    echo "node records: $(grep -h -e 'DefaultTime2Wait' -e 'replacement_timeout' "$R"/node-*.txt 2>/dev/null | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
    cp "$R"/node-*.txt "$S/res/" 2>/dev/null || true
    echo "multipathd: $(multipathd show config 2>/dev/null | awk '/^defaults/{d=1} d && /fast_io_fail_tmo|dev_loss_tmo/{printf "%s %s; ", $1, $2} /^}/{d=0}')"
}
