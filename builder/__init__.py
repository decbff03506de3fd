"""The producer half of abflip: build images, compress them, assemble and publish releases.

External tools (mkfs.erofs, mksquashfs, mke2fs) and boto3 are needed only here; the device
side (``applier``) never imports this package.
"""
