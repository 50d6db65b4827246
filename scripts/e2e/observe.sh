#!/usr/bin/env bash
# Watching a running 3-node cluster (the demo): every path of the admin HTTPS
# listener refuses requests without the token; /metrics passes `promtool check
# metrics` on every node; the example Prometheus configuration and rules pass promtool;
# a real Prometheus scrapes the cluster and sees the demo volume's write counter rise
# while I/O runs; the web console in headless Chromium follows a failover live.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

step "observability: 401 without the token, promtool, Prometheus, the console in Chromium"
work=$(mktemp -d /tmp/bulwark-observe.XXXXXX)
prom_pid=""
cleanup() {
    [ -n "$prom_pid" ] && kill "$prom_pid" 2>/dev/null && wait "$prom_pid" 2>/dev/null
    stop_demo
    rm -rf "$work"
}
trap cleanup EXIT

start_demo "$work"
token=$BULWARK_TOKEN
printf '%s' "$token" >"$work/token"
code() { curl -sk -o /dev/null -w '%{http_code}' "$@"; }

# Nothing without the credential: the console, its script, its API, /metrics.
# (Wrong tokens count against their source address: each comes from its own.)
i=20
for path in / /console.js /api/status /api/stream /metrics /no-such-page; do
    c=$(code "https://127.0.0.1:3263$path")
    [ "$c" = 401 ] || die "GET $path without a token answered $c, not 401"
    i=$((i + 1))
    c=$(code --interface "127.0.0.$i" -H "Authorization: Bearer bwk1:0:0" "https://127.0.0.1:3263$path")
    [ "$c" = 401 ] || die "GET $path with a wrong token answered $c, not 401"
done
c=$(code -X POST -H 'Content-Type: application/json' -d '{"to":"n2"}' https://127.0.0.1:3263/api/volumes/demo/move)
[ "$c" = 401 ] || die "POST move without a token answered $c"
body=$(curl -sk https://127.0.0.1:3263/api/status)
echo "$body" | grep -q demo && die "a 401 carried cluster data: $body"
# Actions need the console's header even with the token (no cross-site requests).
c=$(code -X POST -H "Authorization: Bearer $token" -H 'Content-Type: application/json' -d '{}' https://127.0.0.1:3263/api/volumes/demo/verify)
[ "$c" = 403 ] || die "POST verify without X-Bulwark-Console answered $c, not 403"
# Failed sign-ins are limited per client address (from another loopback address, so
# the rest of this test keeps its own).
for _ in 1 2 3 4 5; do
    c=$(code --interface 127.0.0.9 -d token=bwk1:wrong https://127.0.0.3:3263/login)
    [ "$c" = 401 ] || die "a wrong sign-in answered $c, not 401"
done
c=$(code --interface 127.0.0.9 -d "token=$token" https://127.0.0.3:3263/login)
[ "$c" = 429 ] || die "the 6th sign-in within a minute answered $c, not 429"
grep -q "console sign-in with a wrong credential" "$work/data/n3.log" || die "failed sign-ins are not logged"
echo "401 without the token on every path, 403 for actions without the console header, 429 after 5 failed sign-ins (logged)"

# promtool on every node's /metrics.
for ip in 127.0.0.1 127.0.0.2 127.0.0.3; do
    curl -sfk -H "Authorization: Bearer $token" "https://$ip:3263/metrics" >"$work/metrics.$ip" || die "/metrics of $ip failed"
    out=$(promtool check metrics <"$work/metrics.$ip" 2>&1) || die "promtool check metrics on $ip: $out"
    [ -z "$out" ] || die "promtool check metrics on $ip: $out"
done
grep -q '^bulwark_volume_in_sync_replicas{node="n1",volume="demo"} 2' "$work/metrics.127.0.0.1" || die "n1 (primary) does not report demo's in-sync replicas"
echo "promtool check metrics: clean on n1, n2, n3 ($(grep -vc '^#' "$work/metrics.127.0.0.1") samples on n1)"

# The examples, checked as shipped (the token file made to exist) and run against the demo.
sed -e "s|/etc/prometheus/bulwark-token|$work/token|" examples/prometheus/prometheus.yml >"$work/prometheus.yml"
cp examples/prometheus/bulwark-alerts.yml "$work/"
promtool_ok() { local out; out=$("$@" 2>&1) || { echo "$out"; die "$* failed"; }; echo "$* : ok"; }
promtool_ok promtool check config "$work/prometheus.yml"
promtool_ok promtool check rules examples/prometheus/bulwark-alerts.yml
promtool_ok promtool test rules examples/prometheus/bulwark-alerts.test.yml
python3 - "$work/prometheus.yml" <<'PY'
import re, sys
p = sys.argv[1]
s = open(p).read()
s = s.replace("scrape_interval: 15s", "scrape_interval: 1s")
for i in (1, 2, 3):
    s = s.replace(f'"node{i}:3263"', f'"127.0.0.{i}:3263"').replace(f"node: node{i}", f"node: n{i}")
open(p, "w").write(s)
PY
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
    --web.listen-address=127.0.0.1:19090 >"$work/prometheus.log" 2>&1 &
prom_pid=$!
query() {
    curl -sf --get "http://127.0.0.1:19090/api/v1/query" --data-urlencode "query=$1" |
        python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "none")'
}
for _ in $(seq 1 100); do
    [ "$(query 'count(up{job="bulwark"} == 1)' 2>/dev/null)" = 3 ] && break
    sleep 0.2
done
[ "$(query 'count(up{job="bulwark"} == 1)')" = 3 ] || { tail "$work/prometheus.log"; die "Prometheus does not scrape all 3 nodes"; }
before=$(query 'sum(bulwark_volume_writes_total{volume="demo"})')
qemu-img bench -w -f raw -t none -c 20000 -d 4 -s 4096 "iscsi://127.0.0.1/iqn.2026-11.io.bulwark:demo/0" >"$work/bench.txt" 2>&1 &
bench=$!
rising=""
prev=$before
for _ in $(seq 1 20); do
    sleep 1
    now=$(query 'sum(bulwark_volume_writes_total{volume="demo"})')
    if [ "$now" != none ] && [ "$prev" != none ] && python3 -c "import sys; sys.exit(0 if float('$now') > float('$prev') else 1)"; then
        rising="$rising $now"
    fi
    prev=$now
    [ "$(echo "$rising" | wc -w)" -ge 3 ] && break
done
wait "$bench" || { cat "$work/bench.txt"; die "qemu-img bench failed"; }
[ "$(echo "$rising" | wc -w)" -ge 3 ] || die "Prometheus did not see the write counter rise 3 times (from $before:$rising)"
echo "Prometheus scraped n1-n3; sum(bulwark_volume_writes_total{volume=\"demo\"}) rose from $before through$rising while qemu-img wrote"
kill "$prom_pid"; wait "$prom_pid" 2>/dev/null || true; prom_pid=""

# The console, live through a failover: signed in to n3 (which holds no replica of
# demo), with the primary killed under it. The demo's n1 is both the Raft leader and
# demo's primary; killing both costs an election plus the new leader's wait for the old
# lease before the failover starts (about 2.5 s in all), which says nothing about the
# console. So the volume moves to n2 first, and n2 is the primary that dies.
"$BULWARK_BIN" volume move demo n2 >/dev/null || die "cannot move demo to n2"
primary=n2
ppid=$(sed -n "s/^  $primary: pid \([0-9]*\) .*/\1/p" "$DEMO_OUT")
[ -n "$ppid" ] || die "cannot find n2's pid in the demo's output"
leader=$("$BULWARK_BIN" status --json | python3 -c '
import json, sys
d = json.load(sys.stdin)
ids = [s["Ok"]["raft"]["leader"] for s in d["nodes"].values() if "Ok" in s]
print(d["state"]["nodes"][str(ids[0])]["name"])')
[ "$leader" != "$primary" ] || die "n2 became the Raft leader; the test wants a primary that is not"
# Markup from the network must show as text. The API refuses it in names (iSCSI name
# rules), so it comes the way a stranger's text does: the sender a refused control
# connection names goes into the event log, which the console shows.
evil='<b>bold</b><img/src=x/onerror=window.__xss=1>'
if "$BULWARK_BIN" target create "iqn.2026-11.io.evil:$evil" >/dev/null 2>&1; then
    die "the API accepted a target name with markup in it"
fi
python3 - "$evil" <<'PY' || die "cannot send a hello with markup to n3's control port"
import json, socket, ssl, struct, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
raw = socket.create_connection(("127.0.0.3", 3261), timeout=10, source_address=("127.0.9.9", 0))
with ctx.wrap_socket(raw, server_hostname="bulwark-cluster") as s:
    body = json.dumps({"secret": "0" * 32, "from": sys.argv[1]}).encode()
    s.sendall(struct.pack(">I", len(body)) + body)
    s.recv(4096)
PY
mkdir -p target/screenshots
python3 scripts/e2e/console_test.py https://127.0.0.3:3263/ "$token" "$ppid" "$primary" \
    target/screenshots/console-failover.png "$evil" || die "the console test failed"
