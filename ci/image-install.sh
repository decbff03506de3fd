#!/usr/bin/env bash
# Install abflip into a device's OS image. Run it inside the image's root (a chroot, mkosi's
# postinst script, a Dockerfile RUN, ...), where it makes:
#
#   /opt/abflip/                  a virtual environment holding abflip and its dependencies
#   /usr/local/bin/abflip         a link to /opt/abflip/bin/abflip (the path the systemd units run)
#   /etc/systemd/system/abflip.service, abflip.timer, abflip-health.service, abflip-bless.service   enabled
#
#   ci/image-install.sh WHEELS [ROOT]
#
# WHEELS  a directory of wheels: abflip and every dependency, built on the build host for the
#         image's Debian release and architecture; nothing is downloaded while the image is built:
#             python3 -m venv /tmp/w && /tmp/w/bin/pip wheel --wheel-dir wheels /path/to/abflip
# ROOT    the image's / (default: /). Another value stages a tree whose venv only works at that
#         path (what tests/test_first_contact.py does); an image is built with ROOT=/ in its chroot.
# PYTHON  the image's python3 (default: python3). The image needs Debian's python3 and python3-venv.
#
# Idempotent: a re-run replaces the venv and the link, and re-enables the units.
set -euo pipefail
wheels=${1:?usage: image-install.sh WHEELS [ROOT]}
root=${2:-/}
root=${root%/}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}

venv="$root/opt/abflip"
"$python" -m venv --clear "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-index --find-links "$wheels" abflip
install -d "$root/usr/local/bin"
ln -sfn ../../../opt/abflip/bin/abflip "$root/usr/local/bin/abflip"   # relative: right inside and outside a chroot
install -d "$root/etc/systemd/system" "$root/etc/abflip/hooks"
install -m 0644 "$here/systemd/abflip.service" "$here/systemd/abflip.timer" "$here/systemd/abflip-health.service" \
    "$here/systemd/abflip-bless.service" "$root/etc/systemd/system/"
if command -v systemctl >/dev/null; then
  systemctl --root="${root:-/}" --quiet enable abflip.timer abflip-health.service abflip-bless.service
fi
"$root/usr/local/bin/abflip" --version
