#!/usr/bin/env bash
# abflip in the reference device's root (made by mkroot.sh): ci/image-install.sh run inside it
# (the /opt/abflip venv from WHEELS, /usr/local/bin/abflip, the units enabled), the device's
# configuration and trusted root, the first-boot unit that records the factory image, and the
# image's version in /etc/os-release (IMAGE_ID, IMAGE_VERSION).
#
#   ci/reference-device/add-abflip.sh ROOT WHEELS CONFIG ROOT_JSON VERSION
#
# WHEELS     abflip and its dependencies as wheels (docs/device.md "Installing abflip in a device image")
# CONFIG     the device's /etc/abflip/abflip.toml
# ROOT_JSON  the repository's bootstrap root (metadata/1.root.json), /etc/abflip/root.json
# VERSION    the release this tree becomes (abflip release create --version)
# Needs root (chroot).
set -euo pipefail
root=${1:?usage: add-abflip.sh ROOT WHEELS CONFIG ROOT_JSON VERSION}
wheels=${2:?} config=${3:?} root_json=${4:?} version=${5:?}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

stage="$root/tmp/abflip-install"
rm -rf "$stage"
mkdir -p "$stage/ci" "$stage/wheels"
cp "$repo/ci/image-install.sh" "$stage/ci/"
cp -r "$repo/systemd" "$stage/"
cp "$wheels"/*.whl "$stage/wheels/"
mount -t proc proc "$root/proc"
trap 'umount "$root/proc"; rm -rf "$stage"' EXIT
chroot "$root" /tmp/abflip-install/ci/image-install.sh /tmp/abflip-install/wheels >/dev/null
# abflip runs from the venv; pip and setuptools are not needed on the device
chroot "$root" /opt/abflip/bin/python -m pip uninstall --quiet --yes pip setuptools >/dev/null 2>&1 || true

install -m 0644 "$config" "$root/etc/abflip/abflip.toml"
install -m 0644 "$root_json" "$root/etc/abflip/root.json"
install -m 0644 "$here/abflip-factory.service" "$root/etc/systemd/system/"
systemctl --root="$root" --quiet enable abflip-factory.service

# os-release names the image and its version (systemd's IMAGE_ID / IMAGE_VERSION)
os_release="$root/etc/os-release"
sed '/^IMAGE_ID=/d; /^IMAGE_VERSION=/d' "$root/usr/lib/os-release" > "$os_release.new"
printf 'IMAGE_ID=abflip-reference\nIMAGE_VERSION=%s\n' "$version" >> "$os_release.new"
rm -f "$os_release"
mv "$os_release.new" "$os_release"
