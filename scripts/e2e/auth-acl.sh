#!/usr/bin/env bash
# CHAP (one-way and mutual, one account shared by two targets) and initiator ACLs,
# checked with libiscsi's tools as the initiator.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

step "authentication and ACLs"
work=$(mktemp -d /tmp/bulwark-auth.XXXXXX)
trap 'stop_bulwark; rm -rf "$work"' EXIT
p=iqn.2026-11.io.bulwark
cat >"$work/bulwark.toml" <<TOML
[[chap]]
name = "oneway"
user = "alice"
secret = "alicesecret12"

[[chap]]
name = "mutual"
user = "bob"
secret = "bobsecret1234"
target_user = "bulwark"
target_secret = "targetsecret1"

[[target]]
iqn = "$p:chap1"
portals = ["127.0.0.1:3260", "[::1]:3260"]
chap = ["oneway"]
[[target.lun]]
lun = 0
path = "$work/a.img"
size = "8MiB"

[[target]]
iqn = "$p:chap2"
portals = ["127.0.0.1:3260"]
chap = ["oneway", "mutual"]
[[target.lun]]
lun = 0
path = "$work/b.img"
size = "8MiB"

[[target]]
iqn = "$p:acl"
portals = ["127.0.0.1:3260"]
allowed_initiators = ["iqn.2026-11.io.example:allowed"]
[[target.lun]]
lun = 0
path = "$work/c.img"
size = "8MiB"
TOML
start_bulwark "$work/bulwark.toml" "$work/bulwark.log"

ok() { "$@" >"$work/out" 2>&1 || { cat "$work/out"; die "expected success: $*"; }; }
refused() { if "$@" >"$work/out" 2>&1; then cat "$work/out"; die "expected refusal: $*"; fi; }

ok iscsi-inq "iscsi://alice%alicesecret12@127.0.0.1/$p:chap1/0"
echo "one-way CHAP: right secret accepted"
refused iscsi-inq "iscsi://alice%wrongsecret12@127.0.0.1/$p:chap1/0"
refused iscsi-inq "iscsi://127.0.0.1/$p:chap1/0"
echo "one-way CHAP: wrong or missing secret refused"
ok iscsi-inq "iscsi://alice%alicesecret12@127.0.0.1/$p:chap2/0"
echo "one account bound to two targets works on both"
ok iscsi-inq "iscsi://bob%bobsecret1234@127.0.0.1/$p:chap2/0?target_user=bulwark&target_password=targetsecret1"
echo "mutual CHAP: both sides proven"
refused iscsi-inq "iscsi://bob%bobsecret1234@127.0.0.1/$p:chap2/0?target_user=bulwark&target_password=wrongsecret12"
echo "mutual CHAP: initiator refuses a target that cannot prove the target secret"
refused iscsi-inq "iscsi://bob%bobsecret1234@127.0.0.1/$p:chap2/0"
echo "mutual-only account refuses one-way use"
ok iscsi-inq "iscsi://alice%alicesecret12@[::1]/$p:chap1/0"
echo "IPv6 portal works"

ok iscsi-ls -i iqn.2026-11.io.example:allowed iscsi://127.0.0.1
grep -q "$p:acl" "$work/out" || { cat "$work/out"; die "allowed initiator does not see the ACL target"; }
ok iscsi-ls -i iqn.2026-11.io.example:stranger iscsi://127.0.0.1
if grep -q "$p:acl" "$work/out"; then cat "$work/out"; die "initiator outside the ACL sees the target in discovery"; fi
grep -q "$p:chap1" "$work/out" || { cat "$work/out"; die "discovery lost the other targets"; }
ok iscsi-inq -i iqn.2026-11.io.example:allowed "iscsi://127.0.0.1/$p:acl/0"
refused iscsi-inq -i iqn.2026-11.io.example:stranger "iscsi://127.0.0.1/$p:acl/0"
echo "ACL: outsider neither sees nor logs in to the target"
refused iscsi-inq "iscsi://127.0.0.1/$p:nosuchtarget/0"
grep -q "login refused" "$work/bulwark.log" || die "refused logins are not logged"
echo "unknown target refused and logged"
stop_bulwark
