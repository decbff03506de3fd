#!/usr/bin/env bash
# A copyable release job: build, compress, sign and publish one image with abflip.
#
#   ci/release.sh ROOTFS_DIR VERSION
#
# Environment (set by the pipeline):
#   ABFLIP_PRODUCT      product name (e.g. edge-os)
#   ABFLIP_COMPATIBLE   space-separated hardware ids
#   ABFLIP_KERNEL       kernel image for the boot entry; ABFLIP_INITRD optional
#   ABFLIP_REPO         repository: a directory (or s3://bucket/prefix once S3 publishing lands)
#   ABFLIP_KEYS         keys directory with keys.json (mounted from the pipeline's secret store)
#   ABFLIP_CHANNEL      channel to point at the release (default: stable)
#   SOURCE_DATE_EPOCH   defaults to the last commit's time, so rebuilds are bit-identical
set -euo pipefail
rootfs=${1:?usage: release.sh ROOTFS_DIR VERSION}
version=${2:?usage: release.sh ROOTFS_DIR VERSION}
: "${ABFLIP_PRODUCT:?}" "${ABFLIP_COMPATIBLE:?}" "${ABFLIP_KERNEL:?}" "${ABFLIP_REPO:?}" "${ABFLIP_KEYS:?}"
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

abflip image build "$rootfs" -o "$work/rootfs.img" --json
compat=()
for hw in $ABFLIP_COMPATIBLE; do compat+=(--compatible "$hw"); done
initrd=()
[ -n "${ABFLIP_INITRD:-}" ] && initrd=(--initrd "$ABFLIP_INITRD")
abflip release create --image "$work/rootfs.img" --product "$ABFLIP_PRODUCT" --version "$version" \
    "${compat[@]}" --kernel "$ABFLIP_KERNEL" "${initrd[@]}" --options "${ABFLIP_OPTIONS:-ro quiet}" \
    -o "$work/release" --json
abflip publish "$work/release" --to "$ABFLIP_REPO" --keys "$ABFLIP_KEYS" --channel "${ABFLIP_CHANNEL:-stable}" --json
