#!/usr/bin/env bash
# The Debian package: packaging/build-deb packs the debug build (built before, as
# scripts/test-all does: `cargo build -p bulwark`) with cargo-deb; the package holds the
# binary, the systemd unit (neither enabled nor started by its maintainer scripts),
# /etc/default/bulwark as a conffile, every manual page and the bash, zsh and fish
# completions; the unit as extracted passes `systemd-analyze verify` and the extracted
# binary runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

step "package: Debian package with cargo-deb"
start=$SECONDS
work=$(mktemp -d /tmp/bulwark-package.XXXXXX)
trap 'rm -rf "$work"' EXIT

# Tools: cargo-deb (pinned: it warns that packaging a dev build will become an error);
# dpkg-shlibdeps (dpkg-dev) for Depends, strip (binutils), systemd-analyze (systemd).
CARGO_DEB_VERSION=3.8.0
if ! command -v cargo-deb >/dev/null; then
    echo "installing cargo-deb $CARGO_DEB_VERSION: cargo install cargo-deb --locked --version $CARGO_DEB_VERSION"
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" --quiet || die "cargo install cargo-deb failed"
fi
command -v dpkg-shlibdeps >/dev/null || { echo "installing dpkg-dev (dpkg-shlibdeps)"; apt_install dpkg-dev; }
command -v strip >/dev/null || { echo "installing binutils (strip)"; apt_install binutils; }
command -v systemd-analyze >/dev/null || { echo "installing systemd (systemd-analyze)"; apt_install systemd; }
cargo deb --version

[ -x target/debug/bulwark ] || die "no target/debug/bulwark: run cargo build -p bulwark first"
# --fast: lighter compression, this package is only inspected.
deb=$(packaging/build-deb --profile dev --no-build -- --fast) || die "packaging/build-deb failed"
deb=$(printf '%s\n' "$deb" | tail -1)
[ -f "$deb" ] || die "packaging/build-deb printed no package path (got: $deb)"
echo "package: $deb ($(du -h "$deb" | cut -f1))"

# Contents: dpkg-deb lists ./path; the unit may be in /usr/lib or /lib.
dpkg-deb --contents "$deb" >"$work/contents.txt" || die "dpkg-deb --contents failed on $deb"
awk '{print $NF}' "$work/contents.txt" | sed 's|^\./|/|' >"$work/paths.txt"
has() { grep -qxE "$1" "$work/paths.txt" || { cat "$work/contents.txt"; die "the package has no $2"; }; }
has '/usr/bin/bulwark' "binary /usr/bin/bulwark"
grep -E ' \./usr/bin/bulwark$' "$work/contents.txt" | grep -q '^-rwxr-xr-x' || die "/usr/bin/bulwark is not mode 755"
has '(/usr)?/lib/systemd/system/bulwark\.service' "systemd unit bulwark.service"
has '/etc/default/bulwark' "/etc/default/bulwark"
has '/usr/share/man/man1/bulwark\.1(\.gz)?' "manual page bulwark.1"
has '/usr/share/man/man1/bulwark-serve\.1(\.gz)?' "manual page bulwark-serve.1"
has '/usr/share/bash-completion/completions/bulwark' "bash completion"
has '/usr/share/zsh/vendor-completions/_bulwark' "zsh completion"
has '/usr/share/fish/vendor_completions\.d/bulwark\.fish' "fish completion"
pages=$(grep -cE '^/usr/share/man/man1/bulwark.*\.1(\.gz)?$' "$work/paths.txt")
target/debug/bulwark man "$work/man" >/dev/null
want=$(ls "$work/man" | wc -l)
[ "$pages" -eq "$want" ] || die "the package has $pages manual pages, bulwark man writes $want"
echo "dpkg-deb --contents: binary, unit, /etc/default/bulwark, $pages manual pages, 3 completions"

# Control: conffile, fields, and maintainer scripts that neither enable nor start.
dpkg-deb --info "$deb" conffiles >"$work/conffiles" 2>/dev/null || die "the package has no conffiles"
grep -qx '/etc/default/bulwark' "$work/conffiles" || { cat "$work/conffiles"; die "/etc/default/bulwark is not a conffile"; }
for field in Section:admin Priority:optional; do
    [ "$(dpkg-deb -f "$deb" "${field%%:*}")" = "${field#*:}" ] || die "${field%%:*} is not ${field#*:}: $(dpkg-deb -f "$deb" "${field%%:*}")"
done
dpkg-deb -f "$deb" Depends | grep -q 'libc6' || die "Depends does not name libc6: $(dpkg-deb -f "$deb" Depends)"
[ "$(dpkg-deb -f "$deb" Description | wc -l)" -gt 2 ] || die "no extended description"
dpkg-deb --info "$deb" postinst >"$work/postinst" 2>/dev/null || true
if grep -qE 'deb-systemd-invoke|systemctl (start|restart)|new installations run enable' "$work/postinst"; then
    cat "$work/postinst"; die "postinst enables or starts bulwark.service"
fi
dpkg-deb --info "$deb" prerm >"$work/prerm" 2>/dev/null || true
grep -q 'deb-systemd-invoke stop bulwark.service' "$work/prerm" || { cat "$work/prerm"; die "prerm does not stop bulwark.service on removal"; }
echo "dpkg-deb --info: conffiles /etc/default/bulwark; Section admin, Priority optional, Depends $(dpkg-deb -f "$deb" Depends); unit not enabled or started on install, stopped on removal"

# Extracted: the unit verifies (ExecStart pointed at the extracted binary, since
# verify checks that it exists), the binary runs, pages and completions are what they say.
root="$work/root"
dpkg-deb -x "$deb" "$root" || die "dpkg-deb -x failed"
unit=$root/usr/lib/systemd/system/bulwark.service
[ -f "$unit" ] || unit=$root/lib/systemd/system/bulwark.service
grep -q '^ExecStart=/usr/bin/bulwark ' "$unit" || die "the unit does not run /usr/bin/bulwark"
sed "s|^ExecStart=/usr/bin/bulwark|ExecStart=$root/usr/bin/bulwark|" "$unit" >"$work/bulwark.service"
systemd-analyze verify --man=no "$work/bulwark.service" 2>"$work/verify.txt" || { cat "$work/verify.txt"; die "systemd-analyze verify refused the packaged unit"; }
if grep -v -e '^$' "$work/verify.txt" | grep -q .; then cat "$work/verify.txt"; die "systemd-analyze verify warned about the packaged unit"; fi
echo "systemd-analyze verify: the packaged unit is accepted"

version=$("$root/usr/bin/bulwark" --version) || die "the packaged binary does not run"
[ "$version" = "bulwark $(dpkg-deb -f "$deb" Version | sed 's/-[^-]*$//')" ] || die "binary says '$version', package version is $(dpkg-deb -f "$deb" Version)"
"$root/usr/bin/bulwark" --help >/dev/null || die "bulwark --help failed"
echo "packaged binary: $version"

# /etc/default/bulwark: only comments and VAR=value lines (systemd EnvironmentFile).
if grep -vE '^\s*(#.*)?$|^[A-Z_][A-Z0-9_]*=' "$root/etc/default/bulwark"; then die "/etc/default/bulwark has lines that are not VAR=value"; fi
for page in "$root"/usr/share/man/man1/*; do
    case $page in *.gz) zcat "$page" ;; *) cat "$page" ;; esac | grep -q '^\.TH' || die "$(basename "$page") is not a man page"
done
bash -n "$root/usr/share/bash-completion/completions/bulwark" || die "the bash completion does not parse"
out=$(bash -c ". '$root/usr/share/bash-completion/completions/bulwark'; COMP_WORDS=(bulwark vol); COMP_CWORD=1; _bulwark bulwark vol bulwark; echo \"\${COMPREPLY[*]}\"")
echo "$out" | grep -qw volume || die "packaged bash completion of 'bulwark vol' gave: $out"
grep -q '^#compdef bulwark' "$root/usr/share/zsh/vendor-completions/_bulwark" || die "the zsh completion has no #compdef line"
grep -q '^complete -c bulwark' "$root/usr/share/fish/vendor_completions.d/bulwark.fish" || die "the fish completion has no complete -c bulwark"
echo "manual pages are man(7) pages; bash completes 'bulwark vol' to '$out'; zsh and fish files are completions"
echo "package: ok ($((SECONDS - start)) s)"
