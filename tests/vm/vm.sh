#!/bin/bash
# Run a command as root inside a throw-away QEMU (TCG) guest that boots a stock
# Debian kernel and sees the host's root file system over 9p.  The host kernel
# has no ublk and no KVM; this guest has ublk_drv, nbd, loop and ext4.
#
#   tests/vm/vm.sh [--kernel K] [--timeout SECS] [--mem SIZE] [--smp N] -- COMMAND...
#   tests/vm/vm.sh [--kernel K] --prepare   only fetch/build the cached kernel and
#                                           initramfs; prints the kernel version
#
# --kernel picks the guest kernel (default 6.12):
#   6.12     Debian 12's newest 6.12 (linux-image-6.12.*+deb12-amd64-unsigned from
#            the machine's own apt sources)
#   newest   the newest Linux 7.x or later in Debian unstable (sid), fetched with
#            apt-get download under a private apt configuration (the machine's
#            Debian mirror, suite sid; the machine's apt setup is not touched)
#   VERSION  that kernel, e.g. 6.12.117+deb12-amd64 or 7.2.13+deb14-amd64
#
# One COMMAND argument is a shell script (sh -c); several are an argv, quoted.
# The command runs chrooted into the host root, cwd = the current directory,
# env = HOME, PATH, the caller's UQ*, VM_*, SOAK, CI and *SAN_OPTIONS, plus
# VM_GUEST=1 and VM_TMP (a guest-only tmpfs for fast images); /run/vm-modules holds
# modules to insmod with parameters (brd).  Its stdout/stderr are relayed;
# the exit status is the command's, or 125 if the VM failed or timed out.
# A guest that dies before the command starts (an emulator fault in early boot)
# is booted again, up to three boots in all; VM_TEST_BOOT_PANIC=1 makes the
# first boot panic, to test that.
#
# Kernels and initramfs are cached under ${XDG_CACHE_HOME:-~/.cache}/ublk-qcow2/vm,
# one directory per kernel version (the private apt state for sid in apt-sid/).
# Env: VM_KERNEL_VERSION=6.12.N+deb12-amd64 picks the 6.12 kernel; VM_KERNEL_REFRESH=1
# asks apt for the newest 6.12 / sid kernel instead of reusing a cached one;
# VM_VERBOSE=1 shows the guest console.
set -u -o pipefail

VM_FAIL=125
die() { echo "vm.sh: $*" >&2; exit $VM_FAIL; }

timeout_s=600
mem=2G
smp=2
prepare_only=
kernel=6.12
while [ $# -gt 0 ]; do
	case "$1" in
	--timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; timeout_s=$2; shift 2 ;;
	--mem) [ $# -ge 2 ] || die "--mem needs a size like 2G"; mem=$2; shift 2 ;;
	--smp) [ $# -ge 2 ] || die "--smp needs a cpu count"; smp=$2; shift 2 ;;
	--kernel) [ $# -ge 2 ] || die "--kernel needs 6.12, newest or a version"; kernel=$2; shift 2 ;;
	--prepare) prepare_only=1; shift ;;
	--) shift; break ;;
	-h|--help) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown option '$1' (usage: vm.sh [--kernel 6.12|newest|VERSION] [--timeout SECS] [--mem SIZE] [--smp N] -- COMMAND...)" ;;
	esac
done
[ $# -gt 0 ] || [ -n "$prepare_only" ] || die "no command given (usage: vm.sh [options] -- COMMAND...)"
case "$timeout_s" in ''|*[!0-9]*) die "--timeout must be whole seconds, got '$timeout_s'" ;; esac
case "$smp" in ''|*[!0-9]*) die "--smp must be a number, got '$smp'" ;; esac
case "$kernel" in
6.12|newest) ;;
[0-9]*.*-*[a-z0-9]) case "$kernel" in *[!A-Za-z0-9.+_-]*) die "--kernel '$kernel': not a kernel version" ;; esac ;;
*) die "--kernel must be 6.12, newest or a version like 7.2.13+deb14-amd64, got '$kernel'" ;;
esac

for tool in qemu-system-x86_64 timeout cpio gzip xz sha256sum flock; do
	command -v "$tool" >/dev/null || die "missing '$tool' (Debian: apt-get install qemu-system-x86 cpio xz-utils coreutils util-linux)"
done

# ---------------------------------------------------------------- kernel
cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/ublk-qcow2/vm
mkdir -p "$cache_root" || die "cannot create cache dir $cache_root"

# Modules the guest loads, in the order asked; dependencies are resolved from
# each module's own .modinfo, so this list only needs what we want to use.
# A name ending in '?' is loaded where the kernel has it as a module and left
# out where it has not (built in, or gone): crc32c_generic and libcrc32c exist
# in 6.12 (crc32c_generic first: jbd2 and ext4 ask the crypto API for crc32c at
# mount); from Linux 6.14 on crc32c is a library built into the kernel.
# dm_mod: LVM on ublk devices (tests/vm/t_ublk_del.sh).
WANT_MODULES="netfs 9pnet 9pnet_virtio 9p ublk_drv nbd loop crc32c_generic? crc16 mbcache jbd2 libcrc32c? ext4 dm-mod"
# Modules the guest does not load at boot but offers in /run/vm-modules, for
# tests to insmod with their own parameters (brd: a RAM disk for a file system
# with real asynchronous O_DIRECT, unlike tmpfs).
OPTIONAL_MODULES="brd"

kernel_complete() {	# $1 = cached kernel dir
	local m
	[ -f "$1/vmlinuz" ] && [ -f "$1/modules/order" ] || return 1
	# A cache made for another module list is fetched again.
	[ "$(cat "$1/modules/wanted" 2>/dev/null)" = "$WANT_MODULES" ] || return 1
	for m in $OPTIONAL_MODULES; do [ -f "$1/modules/optional/$m.ko" ] || return 1; done
}

# newest_cached_kernel GLOB...: the newest complete cached kernel whose version matches a GLOB.
newest_cached_kernel() {
	local g d list=
	for g in "$@"; do
		for d in "$cache_root"/$g; do
			kernel_complete "$d" && list="$list${d##*/}
"
		done
	done
	[ -n "$list" ] && printf '%s' "$list" | sort -V | tail -n1
}

newest_apt_kernel() {
	local list
	list=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' 2>/dev/null | cut -d' ' -f1)
	if [ -z "$list" ] && [ "$(id -u)" = 0 ]; then
		echo "vm.sh: no 6.12 kernel in the apt lists, running apt-get update" >&2
		apt-get update -qq >&2 || true
		list=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' 2>/dev/null | cut -d' ' -f1)
	fi
	[ -n "$list" ] || return 1
	printf '%s\n' "$list" | sed 's/^linux-image-//; s/-unsigned$//' | sort -V | tail -n1
}

# ---- Debian unstable (sid), through a private apt configuration
# The machine's apt sources, lists and caches are only read (to find its Debian
# mirror), never written: sid's index and the downloads live in $sid_dir.
sid_dir=$cache_root/apt-sid
SID_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

# The Debian archive URI this machine uses: the first non-security 'deb' source
# whose URI names a Debian archive, from sources.list, *.list (one-line format)
# or *.sources (deb822).  Default: deb.debian.org.
machine_debian_uri() {
	local f uri=
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -r "$f" ] || continue
		uri=$(awk '$1 == "deb" {
			i = 2
			if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
			if ($i ~ /^(https?|ftp):\/\/.*\/debian\/?$/ && $(i + 1) !~ /security/) { print $i; exit }
		}' "$f")
		[ -n "$uri" ] && break
	done
	if [ -z "$uri" ]; then
		for f in /etc/apt/sources.list.d/*.sources; do
			[ -r "$f" ] || continue
			uri=$(awk 'BEGIN { RS = ""; FS = "\n" }
			{
				types = ""; uris = ""; suites = ""; enabled = "yes"
				for (i = 1; i <= NF; i++) {
					if ($i ~ /^#/) continue
					split($i, kv, /:[ \t]*/)
					k = tolower(kv[1]); v = substr($i, length(kv[1]) + 2); sub(/^[ \t]+/, "", v)
					if (k == "types") types = v; else if (k == "uris") uris = v
					else if (k == "suites") suites = v; else if (k == "enabled") enabled = tolower(v)
				}
				if (enabled == "no" || (" " types " ") !~ / deb / || suites ~ /security/) next
				n = split(uris, u, /[ \t]+/)
				for (j = 1; j <= n; j++) if (u[j] ~ /^(https?|ftp):\/\/.*\/debian\/?$/) { print u[j]; exit }
			}' "$f")
			[ -n "$uri" ] && break
		done
	fi
	printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

# sid_apt apt-get|apt-cache ARGS...: the tool with only the private sid source.
sid_apt() {
	local tool=$1; shift
	"$tool" -o Dir::Etc::sourcelist="$sid_dir/sources.list" -o Dir::Etc::sourceparts="$sid_dir/empty" \
		-o Dir::Etc::preferences=/dev/null -o Dir::Etc::preferencesparts="$sid_dir/empty" \
		-o Dir::State::Lists="$sid_dir/lists" -o Dir::Cache="$sid_dir/cache" \
		-o Dir::State::status="$sid_dir/empty-status" \
		-o APT::Architecture=amd64 -o APT::Architectures=amd64 -o Acquire::Languages=none \
		-o APT::Sandbox::User="$(id -un)" "$@"
}

sid_update() {
	command -v apt-get >/dev/null || die "need apt-get to fetch a kernel from Debian unstable"
	[ -r "$SID_KEYRING" ] || die "missing $SID_KEYRING (Debian: apt-get install debian-archive-keyring)"
	mkdir -p "$sid_dir/lists/partial" "$sid_dir/cache/archives/partial" "$sid_dir/empty" || die "cannot create $sid_dir"
	: > "$sid_dir/empty-status"
	local uri
	uri=$(machine_debian_uri)
	echo "deb [signed-by=$SID_KEYRING] $uri sid main" > "$sid_dir/sources.list"
	echo "vm.sh: reading Debian unstable's package index from $uri (private apt state in $sid_dir)" >&2
	sid_apt apt-get -qq update >&2 2>"$sid_dir/update.err" ||
		{ cat "$sid_dir/update.err" >&2; die "apt-get update of Debian unstable ($uri sid) failed"; }
}

# The newest Linux 7.x or later of flavour amd64 in sid, as a version (7.2.13+deb14-amd64).
newest_sid_kernel() {
	local list
	sid_update
	list=$(sid_apt apt-cache search --names-only '^linux-binary-unsigned-[0-9]+\.[0-9.]+\+deb[0-9]+-amd64$' 2>/dev/null |
		cut -d' ' -f1 | sed 's/^linux-binary-unsigned-//' | awk -F. '$1 >= 7')
	[ -n "$list" ] || return 1
	printf '%s\n' "$list" | sort -V | tail -n1
}

# The .modinfo section is NUL-separated key=value strings.
mod_field() { tr '\0' '\n' < "$1" | sed -n "s/^$2=//p" | head -n1; }

# Unpack the kernel packages of $1 into $2/x; sets kimage and mroot.
#   6.12 (Debian 12): one package, linux-image-V-unsigned (boot/vmlinuz-V, lib/modules/V)
#   sid: linux-binary-unsigned-V (usr/lib/modules/V/vmlinuz.unsigned), linux-modules-V
#        (the .ko.xz) and linux-base-V (modules.builtin, config)
download_kernel() {
	local kver=$1 work=$2 pkgs pkg
	case "$kver" in
	*+deb12-*)
		pkgs=linux-image-$kver-unsigned
		echo "vm.sh: downloading $pkgs (about 100 MB, once)" >&2
		if ! (cd "$work" && apt-get download $pkgs >&2 2>"$work/apt.err"); then
			cat "$work/apt.err" >&2; rm -rf "$work"
			die "could not download $pkgs (is it in 'apt-cache policy $pkgs'? try apt-get update)"
		fi
		kimage=$work/x/boot/vmlinuz-$kver mroot=$work/x/lib/modules/$kver ;;
	*)
		pkgs="linux-binary-unsigned-$kver linux-modules-$kver linux-base-$kver"
		[ -f "$sid_dir/sources.list" ] || sid_update
		echo "vm.sh: downloading $pkgs from Debian unstable (about 125 MB, once)" >&2
		if ! (cd "$work" && sid_apt apt-get download $pkgs >&2 2>"$work/apt.err"); then
			# A stale index names files the mirror no longer has: read it again, once.
			sid_update
			if ! (cd "$work" && sid_apt apt-get download $pkgs >&2 2>"$work/apt.err"); then
				cat "$work/apt.err" >&2; rm -rf "$work"
				die "could not download $pkgs from Debian unstable (is $kver still in sid? --kernel newest takes the current one)"
			fi
		fi
		kimage=$work/x/usr/lib/modules/$kver/vmlinuz.unsigned mroot=$work/x/usr/lib/modules/$kver ;;
	esac
	for pkg in "$work"/*.deb; do
		dpkg-deb -x "$pkg" "$work/x" || { rm -rf "$work"; die "dpkg-deb could not unpack $pkg"; }
	done
	[ -f "$kimage" ] && [ -d "$mroot/kernel" ] || { rm -rf "$work"; die "$pkgs: no kernel image or modules for $kver"; }
}

# Download the kernel, keep vmlinuz and the modules we need (decompressed).
fetch_kernel() {
	local kver=$1 dir=$cache_root/$1 work kimage mroot
	command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "need apt-get and dpkg-deb to fetch the guest kernel"
	work=$(mktemp -d "$cache_root/.fetch.XXXXXX") || die "mktemp failed"
	download_kernel "$kver" "$work"
	mkdir -p "$work/out/modules"
	cp "$kimage" "$work/out/vmlinuz"
	cp "$work/x/boot/config-$kver" "$work/out/config" 2>/dev/null || cp "$mroot/config" "$work/out/config" 2>/dev/null

	local order=() seen=" "
	add_module() {	# depth-first: dependencies before the module
		local m=${1%\?} f dep
		case "$seen" in *" $m "*) return 0 ;; esac
		seen="$seen$m "
		f=$(find "$mroot/kernel" -name "$m.ko.xz" -o -name "$m.ko" | head -n1)
		if [ -z "$f" ]; then
			grep -q "/$m\.ko$" "$mroot/modules.builtin" 2>/dev/null && return 0
			case "$1" in *\?) return 0 ;; esac
			die "module $m is neither in the packages of $kver nor built in"
		fi
		case "$f" in
		*.xz) xz -dc "$f" > "$work/out/modules/$m.ko" || die "xz could not decompress $f" ;;
		*) cp "$f" "$work/out/modules/$m.ko" ;;
		esac
		for dep in $(mod_field "$work/out/modules/$m.ko" depends | tr ',' ' '); do
			add_module "$dep"
		done
		order+=("$m")
	}
	local m
	for m in $WANT_MODULES; do add_module "$m"; done
	printf '%s\n' "${order[@]}" > "$work/out/modules/order"
	printf '%s\n' "$WANT_MODULES" > "$work/out/modules/wanted"
	mkdir -p "$work/out/modules/optional"
	for m in $OPTIONAL_MODULES; do
		f=$(find "$mroot/kernel" -name "$m.ko.xz" | head -n1)
		[ -n "$f" ] || die "module $m is not in the packages of $kver"
		xz -dc "$f" > "$work/out/modules/optional/$m.ko" || die "xz could not decompress $f"
	done
	rm -rf "$dir"
	mv "$work/out" "$dir" || die "cannot move kernel into $dir"
	rm -rf "$work"
}

# ---------------------------------------------------------------- initramfs
# The guest's /init.  Its hash is part of the initramfs cache key.
init_script() {
	cat <<'EOF'
#!/bin/busybox sh
# ublk-qcow2 test VM init: load modules, mount the host root, run one command.
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
say() { echo "vm-init: $*"; }
fail() { say "$*"; echo "VM-EXIT-STATUS=fail"; sync; reboot -f; sleep 10; }
# The 9p stack first; the rest loads in the background while the root mounts.
load() { insmod /modules/$1.ko || say "insmod $1 failed"; }
rest=
for m in $(cat /modules/order); do
	case "$m" in netfs|9pnet|9pnet_virtio|9p) load $m ;; *) rest="$rest $m" ;; esac
done
( for m in $rest; do load $m; done ) &
loader=$!
ip link set lo up
run=
for arg in $(cat /proc/cmdline); do
	case "$arg" in vmrun=*) run=${arg#vmrun=} ;; esac
done
[ -n "$run" ] || fail "no vmrun= on the kernel command line"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 hostroot /newroot || fail "cannot mount the host root over 9p"
R=/newroot
mount -t proc proc $R/proc || fail "mount proc"
mount -t sysfs sys $R/sys || fail "mount sys"
mount -t devtmpfs dev $R/dev || fail "mount dev"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs shm $R/dev/shm
mount -t tmpfs -o mode=755 run $R/run || fail "mount /run"
mkdir -p $R/run/lock $R/run/vmtmp $R/run/vm-modules
cp /modules/optional/*.ko $R/run/vm-modules/ 2>/dev/null
# Guest-only tmpfs for images that must be fast (9p is slow); O_DIRECT works on it.
mount -t tmpfs -o mode=1777 vmtmp $R/run/vmtmp || fail "mount /run/vmtmp"
wait $loader
[ -f $R$run/run.sh ] || fail "no $run/run.sh on the host"
# Test hook for vm.sh's boot retry: a kernel panic before the command starts.
grep -qw vmtest_boot_panic /proc/cmdline && echo c > /proc/sysrq-trigger
# From here on a failure is the command's: vm.sh boots again only before this mark.
: > $R$run/started
chroot $R /usr/bin/env -i /bin/sh $run/run.sh </dev/null >$R$run/stdout 2>$R$run/stderr
st=$?
echo $st > $R$run/status
echo "VM-EXIT-STATUS=$st"
sync
reboot -f
EOF
}

build_initramfs() {	# $1 = kernel dir, $2 = output file
	local kdir=$1 out=$2 work bb
	bb=$(command -v busybox) || die "missing busybox (Debian: apt-get install busybox-static)"
	if command -v ldd >/dev/null && ldd "$bb" >/dev/null 2>&1; then
		[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 && bb=/bin/busybox ||
			die "$bb is dynamically linked; the initramfs needs busybox-static"
	fi
	work=$(mktemp -d "$cache_root/.initrd.XXXXXX") || die "mktemp failed"
	mkdir -p "$work/bin" "$work/modules" "$work/proc" "$work/sys" "$work/dev" "$work/newroot"
	cp "$bb" "$work/bin/busybox"
	ln -s busybox "$work/bin/sh"
	cp -r "$kdir"/modules/. "$work/modules/"
	init_script > "$work/init"
	chmod 755 "$work/init"
	(cd "$work" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) > "$work.cpio.gz" ||
		{ rm -rf "$work" "$work.cpio.gz"; die "cpio/gzip failed building the initramfs"; }
	rm -rf "$work"
	mv "$work.cpio.gz" "$out"
}

prepare() {	# sets kver, kdir and initrd; serialised across concurrent runs
	kver=
	case "$kernel" in
	6.12)
		kver=${VM_KERNEL_VERSION:-}
		if [ -z "$kver" ] && [ -z "${VM_KERNEL_REFRESH:-}" ]; then
			kver=$(newest_cached_kernel '6.12.*')
		fi
		if [ -z "$kver" ]; then
			command -v apt-cache >/dev/null || die "no cached kernel and no apt-cache to find one"
			kver=$(newest_apt_kernel) || die "no linux-image-6.12.*+deb12-amd64-unsigned in apt (needs Debian 12 bookworm or bookworm-security sources)"
		fi ;;
	newest)
		if [ -z "${VM_KERNEL_REFRESH:-}" ]; then
			kver=$(newest_cached_kernel '[7-9].*' '[1-9][0-9].*')
		fi
		if [ -z "$kver" ]; then
			kver=$(newest_sid_kernel) || die "no linux-binary-unsigned-7.*-amd64 in Debian unstable"
		fi ;;
	*) kver=$kernel ;;
	esac
	kdir=$cache_root/$kver
	if ! kernel_complete "$kdir"; then
		fetch_kernel "$kver"
	fi
	local key
	key=$( { init_script; cat "$kdir/modules/order"; sha256sum < "$(command -v busybox)"; } | sha256sum | cut -c1-16)
	initrd=$kdir/initramfs-$key.cpio.gz
	[ -f "$initrd" ] || build_initramfs "$kdir" "$initrd"
}

exec 9>"$cache_root/.lock" || die "cannot open $cache_root/.lock"
flock -w 900 9 || die "timed out waiting for another vm.sh preparing the cache"
prepare
flock -u 9
exec 9>&-
[ -z "$prepare_only" ] || { printf '%s\n' "$kver"; exit 0; }

# ---------------------------------------------------------------- run
# The run directory lives on the host and is seen at the same path by the
# guest (whole root shared), so it carries the command in and the result out.
tmpbase=${TMPDIR:-/tmp}
case "$tmpbase" in /run/*|/proc/*|/sys/*|/dev/*) tmpbase=/tmp ;; esac
run=$(mktemp -d "$tmpbase/uq-vm.XXXXXX") || die "mktemp in $tmpbase failed"
run=$(cd "$run" && pwd -P)
case "$run" in *[!A-Za-z0-9_./+-]*) rm -rf "$run"; die "run dir path '$run' has characters the kernel command line cannot carry" ;; esac

qpid=
tail_pids=()
cleanup() {
	[ -n "$qpid" ] && kill "$qpid" 2>/dev/null && wait "$qpid" 2>/dev/null
	local p
	for p in "${tail_pids[@]}"; do kill "$p" 2>/dev/null; done
	rm -rf "$run"
}
trap cleanup EXIT
trap 'exit $VM_FAIL' INT TERM HUP

squote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

{
	echo '#!/bin/sh'
	echo 'export HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
	echo 'export LANG=C.UTF-8 TERM=dumb'
	while IFS= read -r name; do
		echo "export $name=$(squote "${!name}")"
	done < <(compgen -e | grep -E '^(UQ|VM_|SOAK$|CI$|[AUL]SAN_OPTIONS$)' || true)
	echo 'export VM_GUEST=1 VM_TMP=/run/vmtmp'
	echo "cd $(squote "$PWD") || exit $VM_FAIL"
	if [ $# -eq 1 ]; then
		echo "exec /bin/sh -c $(squote "$1")"
	else
		printf 'exec'
		for a in "$@"; do printf ' %s' "$(squote "$a")"; done
		echo
	fi
} > "$run/run.sh"
: > "$run/stdout"
: > "$run/stderr"
: > "$run/console.log"

security=passthrough
[ "$(id -u)" = 0 ] || security=none

loglevel=
[ -n "${VM_VERBOSE:-}" ] || loglevel="quiet loglevel=1"

boot_once() {	# $1 = extra kernel arguments; sets qrc
	rm -f "$run/status" "$run/started"
	: > "$run/stdout"; : > "$run/stderr"; : > "$run/console.log"
	timeout -k 10 "$timeout_s" qemu-system-x86_64 \
		-accel tcg,thread=multi -cpu max -smp "$smp" -m "$mem" \
		-kernel "$kdir/vmlinuz" -initrd "$initrd" \
		-append "console=ttyS0 panic=-1 $loglevel vmrun=$run $1" \
		-display none -monitor none -serial "file:$run/console.log" \
		-nic none -no-reboot \
		-virtfs "local,path=/,mount_tag=hostroot,security_model=$security,multidevs=remap,id=hostroot" \
		</dev/null >"$run/qemu.log" 2>&1 &
	qpid=$!

	# Relay output while the guest writes it; each tail does a last read and
	# exits once qemu (bounded by timeout) is gone.
	tail --pid="$qpid" -s 0.2 -c +1 -f "$run/stdout" &
	tail_pids+=($!)
	tail --pid="$qpid" -s 0.2 -c +1 -f "$run/stderr" >&2 &
	tail_pids+=($!)
	if [ -n "${VM_VERBOSE:-}" ]; then
		tail --pid="$qpid" -s 0.2 -c +1 -f "$run/console.log" >&2 &
		tail_pids+=($!)
	fi

	wait "$qpid"
	qrc=$?
	qpid=
	local p
	for p in "${tail_pids[@]}"; do wait "$p" 2>/dev/null; done
	tail_pids=()
}

# A guest that dies before the command starts is booted again, at most twice.
# TCG with several vCPUs now and then runs a stale copy of kernel text the
# kernel is patching (static keys, int3 in the middle of the patch) and the
# guest panics in an initcall; nothing of ours has run then.  A failure after
# the command started, or a boot that hangs until the timeout, is not retried.
boot_attempts=3
attempt=1
extra=
[ -n "${VM_TEST_BOOT_PANIC:-}" ] && extra=vmtest_boot_panic
while :; do
	boot_once "$extra"
	extra=
	[ -f "$run/started" ] && break     # the command ran (status, if any, is after it)
	[ $qrc -eq 124 ] || [ $qrc -eq 137 ] && break
	[ $attempt -lt $boot_attempts ] || break
	why=$(tr -d '\r' < "$run/console.log" | grep -m1 -E 'Kernel panic|Oops|BUG:|vm-init:' || true)
	echo "vm.sh: the guest failed while booting, before the command started (boot $attempt of $boot_attempts${why:+: $why}); booting again" >&2
	attempt=$((attempt + 1))
done

status=$(cat "$run/status" 2>/dev/null)
case "$status" in
''|*[!0-9]*)
	if [ $qrc -eq 124 ] || [ $qrc -eq 137 ]; then
		echo "vm.sh: VM timed out after ${timeout_s}s" >&2
	else
		echo "vm.sh: VM ended without an exit status (qemu exit $qrc)" >&2
	fi
	echo "vm.sh: --- qemu output ---" >&2; tail -n 20 "$run/qemu.log" >&2
	echo "vm.sh: --- guest console (last 40 lines) ---" >&2; tail -n 40 "$run/console.log" | tr -d '\r' >&2
	exit $VM_FAIL ;;
esac
exit "$status"
