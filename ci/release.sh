#!/usr/bin/env bash
# A copyable release job: build, compress, sign and publish one image with abflip, then audit it.
#
#   ci/release.sh ROOTFS VERSION          ROOTFS: a directory or a tarball (.tar, .tar.gz, .tar.zst)
#
# Environment (set by the pipeline):
#   ABFLIP_PRODUCT       product name (e.g. edge-os)
#   ABFLIP_COMPATIBLE    space-separated hardware ids
#   ABFLIP_KERNEL        kernel image for the boot entry; ABFLIP_INITRD optional
#   ABFLIP_UKI           a unified kernel image instead of ABFLIP_KERNEL/ABFLIP_INITRD
#   ABFLIP_OPTIONS       kernel options (default: "ro quiet")
#   ABFLIP_FSTYPE        erofs (default), squashfs or ext4
#   ABFLIP_MAX_SIZE      slot size in bytes: a larger image fails the job
#   ABFLIP_REPO          repository: a directory or s3://bucket/prefix
#   ABFLIP_KEYS          keys directory with keys.json (mounted from the pipeline's secret store)
#   ABFLIP_CHANNEL       channel to point at the release (default: stable)
#   ABFLIP_ENDPOINT_URL  S3-compatible endpoint (MinIO, R2, ...); ABFLIP_REGION, ABFLIP_PROFILE
#                        (AWS credentials come from boto3's chain: env, profile, OIDC role, ...)
#   ABFLIP_VERIFY        "deep" to download and verify every chunk after publishing; "no" to skip
#   SOURCE_DATE_EPOCH    defaults to the last commit's time, so rebuilds are bit-identical
set -euo pipefail
rootfs=${1:?usage: release.sh ROOTFS VERSION}
version=${2:?usage: release.sh ROOTFS VERSION}
: "${ABFLIP_PRODUCT:?}" "${ABFLIP_COMPATIBLE:?}" "${ABFLIP_REPO:?}" "${ABFLIP_KEYS:?}"
if [ -z "${ABFLIP_KERNEL:-}" ] && [ -z "${ABFLIP_UKI:-}" ]; then
  echo "release.sh: set ABFLIP_KERNEL (and optionally ABFLIP_INITRD) or ABFLIP_UKI" >&2
  exit 2
fi
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

max=()
[ -n "${ABFLIP_MAX_SIZE:-}" ] && max=(--max-size "$ABFLIP_MAX_SIZE")
abflip image build "$rootfs" -o "$work/rootfs.img" --fstype "${ABFLIP_FSTYPE:-erofs}" "${max[@]}" --json
compat=()
for hw in $ABFLIP_COMPATIBLE; do compat+=(--compatible "$hw"); done
boot=()
if [ -n "${ABFLIP_UKI:-}" ]; then
  boot=(--uki "$ABFLIP_UKI")
else
  boot=(--kernel "$ABFLIP_KERNEL")
  [ -n "${ABFLIP_INITRD:-}" ] && boot+=(--initrd "$ABFLIP_INITRD")
fi
abflip release create --image "$work/rootfs.img" --product "$ABFLIP_PRODUCT" --version "$version" \
    "${compat[@]}" "${boot[@]}" --options "${ABFLIP_OPTIONS:-ro quiet}" --fstype "${ABFLIP_FSTYPE:-erofs}" \
    -o "$work/release" --json
# --endpoint-url/--region/--profile default to $ABFLIP_ENDPOINT_URL/$ABFLIP_REGION/$ABFLIP_PROFILE
abflip publish "$work/release" --to "$ABFLIP_REPO" --keys "$ABFLIP_KEYS" --channel "${ABFLIP_CHANNEL:-stable}" --json \
    | tee "$work/published.json"
if grep -q '"visible": false' "$work/published.json"; then
  # a product CI's keys: devices (and repo verify) see it once the online signer ran
  echo "release.sh: published into the product's role; run the repository's online signer (abflip repo snapshot)" >&2
  exit 0
fi
case "${ABFLIP_VERIFY:-yes}" in
  no) ;;
  deep) abflip repo verify "$ABFLIP_REPO" --deep ;;
  *) abflip repo verify "$ABFLIP_REPO" ;;
esac
