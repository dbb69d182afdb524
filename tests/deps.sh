#!/usr/bin/env bash
# Install the Debian packages the build and the tests need, if any is missing.
# Fast no-op when everything is present; non-interactive (run as root, e.g. on CI).
set -euo pipefail

PKGS=(build-essential pkg-config liburing-dev zlib1g-dev libzstd-dev libdeflate-dev libsystemd-dev libssl-dev libgnutls28-dev gnutls-bin qemu-utils fio
      libnbd-bin nbdkit e2fsprogs python3 jq clang qemu-system-x86 busybox-static cpio
      xz-utils kmod udev systemd gnuplot-nox debian-archive-keyring lvm2 fdisk)

# One dpkg-query for all packages; unknown ones simply do not appear in its output.
installed=" $(dpkg-query -W -f='${Package}:${Status}\n' "${PKGS[@]}" 2>/dev/null |
              sed -n 's/:install ok installed$//p' | tr '\n' ' ' || true) "
missing=()
for p in "${PKGS[@]}"; do
    [[ $installed == *" $p "* ]] || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

echo "deps: installing ${missing[*]}"
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "deps: need root to install ${missing[*]}" >&2; exit 1; }
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
