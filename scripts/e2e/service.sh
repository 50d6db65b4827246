#!/usr/bin/env bash
# Running as a service: the systemd unit passes `systemd-analyze verify`; `bulwark
# serve` speaks sd_notify (READY=1 once serving, WATCHDOG=1 at half of WatchdogSec,
# STOPPING=1 on SIGTERM) to a notify socket as systemd would hold it; --log-format json
# writes one JSON object per line; `bulwark man` and `bulwark completions` produce
# manual pages and completion scripts.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

step "service: systemd unit, sd_notify, JSON logs, manual pages, completions"
work=$(mktemp -d /tmp/bulwark-service.XXXXXX)
trap 'stop_bulwark; rm -rf "$work"' EXIT
bin=$(realpath "$BULWARK_BIN")

# The unit, with ExecStart pointing at this build (verify checks the binary exists).
sed "s|^ExecStart=/usr/bin/bulwark|ExecStart=$bin|" packaging/bulwark.service >"$work/bulwark.service"
# --man=no: the Documentation= pages are installed by the package, and checked below.
systemd-analyze verify --man=no "$work/bulwark.service" 2>"$work/verify.txt" || { cat "$work/verify.txt"; die "systemd-analyze verify refused the unit"; }
if grep -v -e '^$' "$work/verify.txt" | grep -q .; then cat "$work/verify.txt"; die "systemd-analyze verify warned about the unit"; fi
echo "systemd-analyze verify: the unit is accepted"

# sd_notify: a datagram socket as systemd's, READY=1 and watchdog keep-alives, then
# STOPPING=1 on SIGTERM; the log is JSON lines meanwhile.
python3 - "$bin" "$work" <<'PY'
import json, os, signal, socket, subprocess, sys, time
bin, work = sys.argv[1], sys.argv[2]
path = os.path.join(work, "notify")
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
s.settimeout(20)
env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000", BULWARK_LOG_FORMAT="json")
cfg = os.path.join(work, "bulwark.toml")
with open(cfg, "w") as f:
    f.write('[[target]]\niqn = "iqn.2026-11.io.bulwark:service"\nportals = ["127.0.0.9:3260"]\n'
            '[[target.lun]]\nlun = 0\npath = "%s/lun0.img"\nsize = "16MiB"\n' % work)
log = open(os.path.join(work, "serve.log"), "w")
p = subprocess.Popen([bin, "serve", "--config", cfg], env=env, stdout=subprocess.DEVNULL, stderr=log)
try:
    got = []
    start = time.time()
    while "READY=1" not in got or got.count("WATCHDOG=1") < 2:
        got.append(s.recv(64).decode())
    print("sd_notify: %s within %.1f s" % (", ".join(got[:4]), time.time() - start))
    p.send_signal(signal.SIGTERM)
    while "STOPPING=1" not in got:
        got.append(s.recv(64).decode())
    p.wait(timeout=20)
    print("sd_notify: STOPPING=1 on SIGTERM, exit status %d" % p.returncode)
    assert p.returncode == 0, "bulwark serve exited with %d" % p.returncode
finally:
    if p.poll() is None:
        p.kill()
log.close()
lines = [l for l in open(os.path.join(work, "serve.log")) if l.strip()]
assert lines, "no log lines"
for l in lines:
    rec = json.loads(l)
    assert "level" in rec and "fields" in rec, rec
print("--log-format json: %d log lines, each a JSON object" % len(lines))
PY

# Manual pages: one for the command and one per subcommand, in man(7) format.
"$BULWARK_BIN" man "$work/man"
for page in bulwark.1 bulwark-serve.1 bulwark-volume-create.1 bulwark-target-paths.1; do
    [ -s "$work/man/$page" ] || die "no manual page $page"
    grep -q '^\.TH' "$work/man/$page" || die "$page is not a man page"
done
echo "bulwark man: $(ls "$work/man" | wc -l) pages"

# Completions: the bash script loads and completes subcommands.
"$BULWARK_BIN" completions bash >"$work/bulwark.bash"
out=$(bash -c ". '$work/bulwark.bash'; COMP_WORDS=(bulwark vol); COMP_CWORD=1; _bulwark bulwark vol bulwark; echo \"\${COMPREPLY[*]}\"")
echo "$out" | grep -qw volume || die "bash completion of 'bulwark vol' gave: $out"
for sh in zsh fish; do
    "$BULWARK_BIN" completions "$sh" >"$work/completions.$sh"
    grep -q bulwark "$work/completions.$sh" || die "no $sh completions"
done
echo "bulwark completions: bash completes 'bulwark vol' to '$out'; zsh and fish scripts generated"
echo "service: ok"
