#!/usr/bin/env bash
# The reference device's OS, without abflip: a minimal Debian 12 root for a read-only erofs slot.
#
#   ci/reference-device/mkroot.sh OUT [MIRROR]
#
# OUT/root        the tree (debootstrap --variant=minbase + the packages below), configured from
#                 ci/reference-device/rootfs/ (fstab, network, journald, initramfs-tools), stripped
#                 (documentation, man pages, locales, apt, kernel modules the device does not load)
# OUT/vmlinuz     the kernel of Debian's linux-image-amd64, moved out of OUT/root/boot
# OUT/initrd.img  Debian's own initramfs-tools initrd for it (root=PARTLABEL=root-a|root-b
#                 rootfstype=erofs ro; its local-top script opens a verity root when the entry names one,
#                 its local-bottom script mounts the data partition at /var and binds the device's
#                 machine-id, see rootfs/etc/initramfs-tools/scripts/)
# OUT/packages    the installed packages and versions (dpkg-query), what the image is made of
#
# Needs root (debootstrap, chroot) and debootstrap; MIRROR defaults to http://deb.debian.org/debian.
# Next: ci/reference-device/add-abflip.sh OUT/root WHEELS CONFIG ROOT_JSON, then
# `abflip image build` and `abflip release create` (docs/device.md "Building a device image").
set -euo pipefail
out=${1:?usage: mkroot.sh OUT [MIRROR]}
mirror=${2:-http://deb.debian.org/debian}
here=$(cd "$(dirname "$0")" && pwd)
root="$out/root"

# Everything the device runs. linux-image-amd64 + initramfs-tools: Debian's kernel and initrd;
# systemd-boot: systemd-bless-boot and its generator (abflip blesses first, see docs/device.md);
# busybox: the initrd's shell tools; cryptsetup-bin: veritysetup, which opens a verity root in the
# initrd; python3-venv: abflip's virtual environment.
PACKAGES=systemd,systemd-sysv,udev,kmod,systemd-boot,python3,python3-venv,linux-image-amd64,initramfs-tools,busybox,zstd,cryptsetup-bin
# Kernel modules the device loads (with their dependencies); everything else is deleted.
MODULES="virtio_pci virtio_blk virtio_net virtio_console virtio_rng erofs ext4 vfat nls_cp437 nls_ascii nls_utf8
         efivarfs crc32c_generic dm_mod dm_verity i6300esb"

rm -rf "$root"
mkdir -p "$out"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" "$mirror"

mount -t proc proc "$root/proc"
trap 'umount "$root/proc"' EXIT
cp -a "$here/rootfs/." "$root/"
chmod 0755 "$root/etc/initramfs-tools/hooks/"* "$root/etc/initramfs-tools/scripts/local-"*/*
echo abflip-device > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tabflip-device\n' > "$root/etc/hosts"
: > "$root/etc/machine-id"            # the real one is on the data partition (bound over this by the initrd)
rm -f "$root/var/lib/dbus/machine-id"
systemctl --root="$root" --quiet enable systemd-networkd.service systemd-networkd-wait-online.service
systemctl --root="$root" --quiet mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
    fstrim.timer getty@tty1.service

# Kernel modules: only MODULES and what they need.
kver=$(basename "$(ls -d "$root"/lib/modules/*)")
keep=$(for m in $MODULES; do chroot "$root" modprobe -S "$kver" --show-depends "$m" 2>/dev/null || true; done |
       awk '$1 == "insmod" {print $2}' | sort -u)
find "$root/lib/modules/$kver/kernel" -name '*.ko*' | while read -r ko; do
  grep -qxF "${ko#"$root"}" <<<"$keep" || rm -f "$ko"
done
find "$root/lib/modules/$kver/kernel" -type d -empty -delete
chroot "$root" depmod "$kver"
rm -rf "$root/lib/firmware"

# Debian's initrd for this kernel, as configured in rootfs/etc/initramfs-tools/.
chroot "$root" update-initramfs -u -k "$kver" >/dev/null
cp "$root/boot/vmlinuz-$kver" "$out/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$out/initrd.img"
rm -f "$root"/boot/* "$root"/vmlinuz* "$root"/initrd.img*

chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' > "$out/packages"
umount "$root/proc"
trap - EXIT

# Small: no apt on a read-only image; no documentation (copyright files stay), man pages, locales.
chroot "$root" dpkg --purge --force-remove-essential apt >/dev/null 2>&1 || true
find "$root/usr/share/doc" -type f ! -name copyright -delete
find "$root/usr/share/doc" -type d -empty -delete
rm -rf "$root"/usr/share/{man,info,locale,lintian,linda,bash-completion} "$root"/var/cache/apt "$root"/var/lib/apt/lists \
    "$root"/var/cache/debconf/*-old "$root"/var/log/* "$root"/tmp/* "$root"/usr/share/i18n
# /var is the data partition at run time (the image's /var is hidden under it): keep it empty.
find "$root/var" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
mkdir -p "$root/efi"
du -sh --apparent-size "$root" | sed 's/^/root tree: /'
