#!/bin/bash
# The kernel-initiator guest's agent: bwvm-agent.service (baked into the image by
# scripts/vm/build-image.sh) mounts the host's 9p share on /share and runs this file
# from it (the harness copies it there as agent.sh).
#
# Protocol: the host writes a command as /share/cmd/NNNNN.sh (written as .tmp, then
# renamed); the agent runs each new one in order with bash, the guest library
# (/share/guest-lib.sh) sourced, its output in NNNNN.out, and writes its exit status to
# NNNNN.rc (again .tmp then rename) when it is done. A command that must outlive its
# call (fio through a fault) detaches itself (setsid ... &). /share/ready says the
# agent is up, with the guest's address configured.
set -u
S=/share
mkdir -p "$S/cmd"

# The guest's only network: the harness's bridge in the host's namespace.
ip link set lo up
ip link set eth0 up
ip addr add "${BWVM_GUEST_ADDR:-198.18.0.10/24}" dev eth0 2>/dev/null || true

echo "bwvm-agent: up, $(uname -r), $(ip -br addr show eth0)"
date -u +%FT%TZ >"$S/ready.tmp" && mv "$S/ready.tmp" "$S/ready"

while :; do
    for f in "$S"/cmd/*.sh; do
        [ -e "$f" ] || continue
        id=${f##*/}
        id=${id%.sh}
        [ -e "$S/cmd/$id.taken" ] && continue
        : >"$S/cmd/$id.taken"
        rc=0
        bash -c '. /share/guest-lib.sh && . "$1"' bwvm-cmd "$f" >"$S/cmd/$id.out" 2>&1 </dev/null || rc=$?
        echo "$rc" >"$S/cmd/$id.rc.tmp" && mv "$S/cmd/$id.rc.tmp" "$S/cmd/$id.rc"
    done
    sleep 0.1
done
