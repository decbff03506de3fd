"""Compute a release image's dm-verity hash tree (the format: :mod:`metadata.verity`).

For a ``--verity`` release a slot holds the filesystem image, zeros up to the next 4 KiB, then the hash tree.
:func:`make_tree` writes what follows the image, the padding and the tree, into a file of its own (``rootfs.verity``
in the release directory, about 1/128 of the image): ``release create`` compresses the image and that file as one
stream (:func:`builder.compress.compress_image`'s ``tail``) without copying the image, and a factory flashes
``cat rootfs.img rootfs.verity`` into a slot. The tree is computed here, in Python, and checked byte for byte
against ``veritysetup format`` by the tests (tests/test_verity.py), so the producer needs no cryptsetup.

Speed: every data block is hashed once, ``sha256(salt || block)`` from a copy of a salted hash state, in threads;
hashlib releases the GIL only inside each 4 KiB update, so the per-block loop is what costs: measured 1.0 s wall and
1.0 s CPU per GiB with two threads (0.94-1.0 s CPU per GiB for any way of writing the loop: a bytes concatenation,
local names). ``release create`` therefore runs it in one thread beside the image's compression
(``builder.release.compress_with_tree``): README "Performance", bench/compress.py ``--verity``. Memory: the image and the
tree are memory-mapped, never read whole.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from metadata.verity import BLOCK, DIGEST, Verity, level_blocks

__all__ = ["make_tree", "default_salt", "tail_size", "TAIL_NAME"]

TAIL_NAME = "rootfs.verity"  # in a release directory: what follows the image in the slot
SLICE = 4096  # blocks per thread task (16 MiB of data)


def default_salt(product: str) -> str:
    """The salt of a product's trees: one per product, so a block that did not change keeps its digest from
    release to release, and a delta carries only the tree blocks over changed data (docs/formats.md)."""
    return hashlib.sha256(b"abflip-verity-salt/1\0" + product.encode()).hexdigest()


def tail_size(image_size: int) -> int:
    """Bytes of what follows an image of ``image_size`` bytes in its slot: the zeros to the next block and the tree."""
    data_blocks = -(-image_size // BLOCK)
    return data_blocks * BLOCK - image_size + sum(level_blocks(data_blocks)) * BLOCK


class Stopped(Exception):
    """make_tree was told to stop (the stream it feeds failed)."""


def _hash_blocks(src: memoryview, dst: memoryview, salted, first: int, last: int, stop=None) -> None:
    if stop is not None and stop.is_set():
        raise Stopped()
    for k in range(first, last):
        h = salted.copy()
        h.update(src[k * BLOCK:(k + 1) * BLOCK])
        dst[k * DIGEST:(k + 1) * DIGEST] = h.digest()


def _hash_level(src: memoryview, dst: memoryview, salted, pool: ThreadPoolExecutor, stop=None) -> None:
    """The digest of each whole block of ``src``, packed into ``dst``."""
    blocks = len(src) // BLOCK
    futures = [pool.submit(_hash_blocks, src, dst, salted, s, min(s + SLICE, blocks), stop) for s in range(0, blocks, SLICE)]
    try:
        for f in futures:
            f.result()
    finally:
        for f in futures:  # none may still write into the mapping once this returns
            f.cancel()
        for f in futures:
            if not f.cancelled():
                f.exception()


def make_tree(image: Path, out: Path, salt_hex: str, *, threads: int = 0, made: bool = False, stop=None) -> Verity:
    """Write the zeros that pad ``image`` to a block and its hash tree to ``out`` (a new file, or with ``made`` one
    the caller made already, ``tail_size`` bytes of zeros: ``release create`` maps it into the stream while the tree
    is computed, and compresses the chunks over the tail once this returned); return the tree's record. ``stop``
    (a ``threading.Event``): set, the work ends at the next slice with :class:`Stopped`. A failure leaves ``out``
    half written, for the caller (who made it in a private directory) to remove."""
    size = os.path.getsize(image)
    if size == 0:
        raise ValueError("empty image")
    data_blocks = -(-size // BLOCK)
    levels = level_blocks(data_blocks)
    offset = data_blocks * BLOCK
    pad = offset - size
    tail_size = pad + sum(levels) * BLOCK
    salted = hashlib.sha256(bytes.fromhex(salt_hex))
    with open(image, "rb") as src, open(out, "r+b" if made else "x+b") as dst:
        if os.fstat(dst.fileno()).st_size != (tail_size if made else 0):
            raise ValueError(f"{out} is not an empty tail of {tail_size} bytes")
        dst.truncate(tail_size)  # zeros: the padding, and each hash block's unused end
        if not levels:  # one data block: the root hash is its digest, there is no tree
            h = salted.copy()
            h.update(src.read(BLOCK).ljust(BLOCK, b"\0"))
            return Verity(data_blocks, offset, salt_hex, h.hexdigest())
        with mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as data, mmap.mmap(dst.fileno(), tail_size) as tree, \
                ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            dv, tv = memoryview(data), memoryview(tree)
            parts: list[memoryview] = []
            try:
                # Levels on disk: the top one first, level 0 (the digests of the data blocks) last.
                ends = [tail_size - sum(levels[:i]) * BLOCK for i in range(len(levels))]
                level0 = tv[ends[0] - levels[0] * BLOCK:ends[0]]
                parts += [dv, level0]
                _hash_level(dv, level0, salted, pool, stop)  # the whole blocks
                if size % BLOCK:  # the last block, zero-padded
                    h = salted.copy()
                    h.update(bytes(dv[(data_blocks - 1) * BLOCK:]).ljust(BLOCK, b"\0"))
                    level0[(data_blocks - 1) * DIGEST:data_blocks * DIGEST] = h.digest()
                below = level0
                for end, n in zip(ends[1:], levels[1:]):
                    level = tv[end - n * BLOCK:end]
                    parts.append(level)
                    _hash_level(below, level, salted, pool, stop)
                    below = level
                h = salted.copy()
                h.update(below)  # the one top block
                root = h.hexdigest()
            finally:
                for p in parts:  # no slice may outlive its mapping (closing it would raise over any error)
                    p.release()
                below = level = level0 = None
                dv.release()
                tv.release()
            tree.flush()
        os.fsync(dst.fileno())
    return Verity(data_blocks, offset, salt_hex, root)
