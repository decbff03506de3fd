"""The dm-verity hash tree of a release's image: its layout, its manifest record, its kernel arguments.

A release made with ``abflip release create --verity`` carries its dm-verity hash tree *inside the image*
(docs/formats.md "dm-verity"): the slot holds the filesystem, zeros up to the next 4 KiB, then the tree, and the
manifest's ``image.size``/``image.sha256`` and chunk table cover all of it, so the tree streams and is verified
with the image like any other byte. ``image.verity`` records what the kernel needs to check every block read
afterwards: the root hash, the salt, the number of data blocks and where the tree starts.

The tree is veritysetup's on-disk format (cryptsetup ``lib/verity/verity_hash.c``, hash format 1) without a
superblock: sha256, 4 KiB data and hash blocks, each digest ``sha256(salt || block)``, 128 digests to a hash
block (the rest of a block zeros), levels stored top level first, the root hash the digest of the one top block
(of the only data block when there is one). Without a superblock nothing on the slot is read before it is
verified: every parameter comes from the signed manifest.

Pure: layouts and records in, numbers and strings out. Both halves use it: ``builder/verity.py`` computes the
tree, the device (``applier/bootloader``) writes :func:`kernel_args` into the boot entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "BLOCK",
    "DIGEST",
    "HASH",
    "FORMAT",
    "MAPPER_NAME",
    "Verity",
    "level_blocks",
    "tree_bytes",
    "verity_problem",
    "kernel_args",
]

BLOCK = 4096  # data and hash block size
DIGEST = 32  # sha256
HASH = "sha256"
FORMAT = 1  # veritysetup's hash format 1 (0 is Chrome OS's: the salt after the block)
PER_BLOCK = BLOCK // DIGEST  # digests in a hash block
MAPPER_NAME = "abflip-root"  # /dev/mapper/<name>: the verified root the entry's root= names
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_KEYS = ("format", "hash", "data_block_size", "hash_block_size", "data_blocks", "hash_offset", "salt", "root_hash")


def level_blocks(data_blocks: int) -> list[int]:
    """Hash blocks of each level, the lowest (digests of data blocks) first: ``ceil(n / 128**(i+1))``
    until one block holds a level (none for a single data block), as veritysetup lays them out."""
    if data_blocks < 1:
        raise ValueError("a verity tree needs at least one data block")
    sizes = []
    n = data_blocks
    while n > 1:
        n = -(-n // PER_BLOCK)
        sizes.append(n)
    return sizes


def tree_bytes(data_blocks: int) -> int:
    """The size of the hash area (no superblock)."""
    return sum(level_blocks(data_blocks)) * BLOCK


@dataclass(frozen=True)
class Verity:
    """``image.verity`` of a release manifest: the image's first ``data_blocks`` 4 KiB blocks are the verified
    data (the filesystem, zero-padded to a block), the hash tree starts at ``hash_offset`` (right after them)
    and ends at the end of the image."""

    data_blocks: int
    hash_offset: int
    salt: str  # hex, 32 bytes
    root_hash: str  # hex
    format: int = FORMAT
    hash: str = HASH
    data_block_size: int = BLOCK
    hash_block_size: int = BLOCK

    @property
    def data_size(self) -> int:
        return self.data_blocks * self.data_block_size

    @property
    def image_size(self) -> int:
        """What ``image.size`` must be: the data, then the tree."""
        return self.hash_offset + tree_bytes(self.data_blocks)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in _KEYS}

    @classmethod
    def from_json(cls, d: dict) -> Verity:
        """From a dict :func:`verity_problem` accepted."""
        return cls(d["data_blocks"], d["hash_offset"], d["salt"], d["root_hash"], d["format"], d["hash"],
                   d["data_block_size"], d["hash_block_size"])


def verity_problem(value: object, image_size: int, max_image_size: int) -> str | None:
    """What is wrong with an ``image.verity`` record of an image of ``image_size`` bytes, or None.

    Exactly the keys of :class:`Verity` (a key this device does not know may change what the tree means: refused,
    not ignored); format 1, sha256, 4 KiB blocks (what the device's initrd opens); the tree right after the data
    and ending where the image ends."""
    if not isinstance(value, dict):
        return "image.verity is not an object"
    if unknown := sorted(set(value) - set(_KEYS), key=str)[:3]:
        return f"image.verity has unknown key(s) {', '.join(repr(k) for k in unknown)}"
    for key, want in (("format", FORMAT), ("hash", HASH), ("data_block_size", BLOCK), ("hash_block_size", BLOCK)):
        if value.get(key) != want or isinstance(value.get(key), bool):
            return f"image.verity.{key}={value.get(key)!r} is not {want!r} (the only one devices open)"
    blocks = value.get("data_blocks")
    if not isinstance(blocks, int) or isinstance(blocks, bool) or not 1 <= blocks <= max_image_size // BLOCK:
        return f"image.verity.data_blocks={blocks!r} is not an integer in [1, {max_image_size // BLOCK}]"
    if value.get("hash_offset") != blocks * BLOCK or isinstance(value.get("hash_offset"), bool):
        return (f"image.verity.hash_offset={value.get('hash_offset')!r} is not where the data ends "
                f"({blocks} blocks: {blocks * BLOCK})")
    for key in ("salt", "root_hash"):
        if not isinstance(value.get(key), str) or not _HEX64.match(value[key]):
            return f"image.verity.{key} is not 64 lowercase hex digits"
    if (want := blocks * BLOCK + tree_bytes(blocks)) != image_size:
        return (f"image.verity: {blocks} data blocks and their tree are {want} bytes, but image.size is "
                f"{image_size}")
    return None


def kernel_args(v: Verity, data_device: str | None = None) -> str:
    """The kernel command line words that open the verified root: ``root=`` the mapping, and the tree's
    parameters for the initrd (``ci/reference-device``'s ``scripts/local-top/abflip-verity`` opens it with
    ``veritysetup open``). ``data_device`` (``PARTLABEL=root-b``) names the slot; without it (a signed UKI's
    command line, which cannot know the slot it boots from) the initrd takes the slot whose tree's top block
    hashes to the root hash. Every word is device-owned (``root``, ``abflip.*``): a release's own options
    cannot set one."""
    words = [f"root=/dev/mapper/{MAPPER_NAME}", f"abflip.verity={v.root_hash}",
             f"abflip.verity.salt={v.salt}", f"abflip.verity.data_blocks={v.data_blocks}",
             f"abflip.verity.hash_offset={v.hash_offset}"]
    if data_device is not None:
        words.append(f"abflip.verity.data={data_device}")
    return " ".join(words)
