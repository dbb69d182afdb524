#!/usr/bin/env bash
# make install / uninstall into a DESTDIR; the systemd unit passes
# systemd-analyze verify; the man page renders without warnings; the udev
# name of a device is its image path escaped exactly as systemd-escape --path.
# timeout: 120
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
tmp=${UQ_TMP:-$(mktemp -d)}
UQ=${UQ:-$root/build/debug/ublk-qcow2}
build=$(dirname "$UQ")
ok() { echo "ok $1"; }
nok() { echo "not ok $1: $2"; }
dest=$tmp/dest

# --- install -------------------------------------------------------------------
if make -C "$root" -s install MODE=debug BUILD="$build" DESTDIR="$dest" PREFIX=/usr >"$tmp/install.log" 2>&1; then
	ok install_runs
else
	nok install_runs "$(tail -n 5 "$tmp/install.log" | tr '\n' ' ')"
fi
files=(usr/bin/ublk-qcow2 usr/share/man/man8/ublk-qcow2.8 usr/lib/systemd/system/ublk-qcow2@.service
       usr/lib/udev/rules.d/99-ublk-qcow2.rules)
missing=
for f in "${files[@]}"; do [ -f "$dest/$f" ] || missing="$missing $f"; done
[ -z "$missing" ] && ok install_files || nok install_files "missing:$missing"
[ -x "$dest/usr/bin/ublk-qcow2" ] && "$dest/usr/bin/ublk-qcow2" --version >/dev/null &&
	ok install_binary_runs || nok install_binary_runs "installed binary does not run"
if grep -q '^ExecStart=/usr/bin/ublk-qcow2 add --foreground ' "$dest/usr/lib/systemd/system/ublk-qcow2@.service" &&
   grep -q 'PROGRAM="/usr/bin/ublk-qcow2 list -n %n --udev-name"' "$dest/usr/lib/udev/rules.d/99-ublk-qcow2.rules" &&
   ! grep -q '@BINDIR@' "$dest"/usr/lib/systemd/system/* "$dest"/usr/lib/udev/rules.d/*; then
	ok install_paths_substituted
else
	nok install_paths_substituted "unit or rule does not name /usr/bin/ublk-qcow2"
fi
# PREFIX=/usr/local: udev does not read /usr/local, so the rule goes to /etc.
make -C "$root" -s install MODE=debug BUILD="$build" DESTDIR="$tmp/dest2" >/dev/null 2>&1
[ -f "$tmp/dest2/etc/udev/rules.d/99-ublk-qcow2.rules" ] && [ -f "$tmp/dest2/usr/local/bin/ublk-qcow2" ] &&
	ok install_local_prefix || nok install_local_prefix "$(cd "$tmp/dest2" && find . -type f | tr '\n' ' ')"

# --- the unit, as systemd reads it -------------------------------------------------
if command -v systemd-analyze >/dev/null; then
	mkdir -p "$tmp/units"
	# The template under its own name; an instance of it is verified (the
	# executable it names must exist here, so point it at the installed one).
	sed "s|/usr/bin/ublk-qcow2|$dest/usr/bin/ublk-qcow2|" "$dest/usr/lib/systemd/system/ublk-qcow2@.service" \
		>"$tmp/units/ublk-qcow2@.service"
	inst=$(systemd-escape --path /var/lib/images/vm.qcow2)
	out=$(systemd-analyze verify --man=no "$tmp/units/ublk-qcow2@$inst.service" 2>&1); rc=$?
	[ $rc = 0 ] && [ -z "$out" ] && ok unit_verifies || nok unit_verifies "rc $rc: $(tr '\n' ' ' <<<"$out")"
else
	nok unit_verifies "systemd-analyze is not installed (make deps installs systemd)"
fi

# --- man page ------------------------------------------------------------------------
out=$(groff -man -ww -z "$dest/usr/share/man/man8/ublk-qcow2.8" 2>&1)
[ -z "$out" ] && ok man_page_renders || nok man_page_renders "$(tr '\n' ' ' <<<"$out")"

# --- udev names ------------------------------------------------------------------------
# State files of made-up devices (ids no kernel gives out here) in the real
# state directory: `list --udev-name` reads nothing else.
state=/run/ublk-qcow2
mkdir -p "$state"
ids=()
trap 'for i in "${ids[@]}"; do rm -f "$state/ublk$i.json"; done' EXIT
n=0 bad=
for path in /var/lib/images/vm.qcow2 "/tmp/a b/c-d.qcow2" /srv/.hidden/x.img "/tmp//double//slash.qcow2" \
            "/tmp/ünï-cödé.qcow2" '/tmp/q"uo\te.qcow2'; do
	id=$((990000 + n)); n=$((n + 1)); ids+=("$id")
	python3 -c 'import json, sys; print(json.dumps({"id": int(sys.argv[1]), "pid": 1, "image": sys.argv[2], "format": "qcow2"}))' \
		"$id" "$path" >"$state/ublk$id.json"
	got=$("$UQ" list -n "$id" --udev-name 2>&1); want=$(systemd-escape --path "$path")
	[ "$got" = "$want" ] || bad="$bad [$path: got '$got', want '$want']"
done
[ -z "$bad" ] && ok udev_name_escapes_like_systemd || nok udev_name_escapes_like_systemd "$bad"
out=$("$UQ" list -n 999999 --udev-name 2>&1); rc=$?
[ $rc = 1 ] && grep -q "no state file" <<<"$out" && ok udev_name_unknown_device ||
	nok udev_name_unknown_device "rc $rc: $out"

# --- uninstall -------------------------------------------------------------------------
make -C "$root" -s uninstall DESTDIR="$dest" PREFIX=/usr >/dev/null 2>&1
left=$(find "$dest" -type f | wc -l)
[ "$left" = 0 ] && ok uninstall_removes_all || nok uninstall_removes_all "$left files left"
