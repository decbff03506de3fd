"""Unit tests of the pure parts: versions, manifest bounds, policy, chunk verification,
entry naming, and the systemd-boot model."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import zstandard

from abflip.sim import parse_loader_entry, select_entry, strverscmp_improved
from applier.bootloader.systemd_boot import blessed_name, entry_text, loader_version, new_entry, parse_entry
from applier.policy import check_release, floor_of
from applier.stream import ChunkError, decompress_chunk, verify_chunk
from builder.compress import compress_image
from metadata.errors import PolicyError, UserError
from metadata.manifest import Boot, BootFile, Channel, Chunk, Compression, Image, Limits, ManifestError, Release
from metadata.version import Version

H = "0" * 64


# -- versions -------------------------------------------------------------------------------
def test_semver_order():
    vs = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11",
          "1.0.0-rc.1", "1.0.0", "1.0.1", "1.10.0", "2.0.0"]
    parsed = [Version.parse(v) for v in vs]
    assert parsed == sorted(parsed[::-1])
    assert Version.parse("1.0.0+build.5") == Version.parse("1.0.0")


@pytest.mark.parametrize("bad", ["1", "1.0", "01.0.0", "1.0.0-", "v1.0.0", "1.0.0-01", "x" * 100, ""])
def test_semver_rejects(bad):
    with pytest.raises(UserError):
        Version.parse(bad)


def test_loader_version_orders_prereleases_like_semver():
    assert strverscmp_improved("1.0.0-rc.1", "1.0.0") > 0  # systemd's own reading of '-'
    assert strverscmp_improved(loader_version("1.0.0-rc.1"), loader_version("1.0.0")) < 0
    assert strverscmp_improved("10.0.0", "9.0.0") > 0


# -- manifest -------------------------------------------------------------------------------
def _release(**image_kw) -> Release:
    chunks = image_kw.pop("chunks", (Chunk(0, 10, H, 0, 100, H), Chunk(10, 5, H, 100, 50, H)))
    image = Image("p/releases/1.0.0/rootfs.img.zst", "erofs", image_kw.pop("size", 150), H,
                  Compression("zstd", 9, 4096, 4096), chunks)
    bf = BootFile("p/releases/1.0.0/vmlinuz", H, 10)
    return Release("p", Version.parse("1.0.0"), ("hw",), 0, image, Boot(bf, None, "ro"))


def test_manifest_round_trip():
    r = _release()
    assert Release.from_bytes(r.to_bytes()) == r


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema="other"), "schema"),
    (lambda d: d.update(version="1.0"), "semantic version"),
    (lambda d: d.update(compatible=[]), "compatible"),
    (lambda d: d["image"].update(size=151), "decompress to"),
    (lambda d: d["image"]["chunks"][1].update(offset=11), "not contiguous"),
    (lambda d: d["image"]["chunks"][0].update(sha256="zz"), "malformed"),
    (lambda d: d["image"]["chunks"][0].update(out_length=1 << 40), "not an integer in"),
    (lambda d: d["image"].update(fstype="vfat"), "fstype"),
    (lambda d: d["boot"].update(options="a\nb"), "options"),
    (lambda d: d.update(product="../etc"), "malformed"),
])
def test_manifest_rejects(mutate, message):
    d = _release().to_json()
    mutate(d)
    with pytest.raises(ManifestError, match=message):
        Release.from_bytes(json.dumps(d).encode())


def test_manifest_size_and_chunk_count_bounded():
    data = _release().to_bytes()
    with pytest.raises(ManifestError, match="more than the limit"):
        Release.from_bytes(data, Limits(manifest_max_bytes=len(data) - 1))
    with pytest.raises(ManifestError, match="1 to 1 chunks"):
        Release.from_bytes(data, Limits(max_chunks=1))
    with pytest.raises(ManifestError, match="not valid JSON"):
        Release.from_bytes(b"{nope")


def test_channel_round_trip():
    c = Channel("p", "stable", Version.parse("2.0.0"), "p/releases/2.0.0/release.json")
    assert Channel.from_bytes(c.to_bytes()) == c


# -- policy ---------------------------------------------------------------------------------
def _check(version="2.0.0", floor="1.0.0", hw="hw", failed=(), **kw):
    r = _release()
    r = Release(r.product, Version.parse(version), r.compatible, r.created, r.image, r.boot)
    ch = Channel("p", "stable", r.version, r.target_path)
    check_release(r, ch, product="p", hardware_id=hw, floor=floor_of(floor, None), failed_versions=list(failed), **kw)


def test_policy():
    _check()
    with pytest.raises(PolicyError, match="not compatible"):
        _check(hw="other")
    with pytest.raises(PolicyError, match="not newer"):
        _check(version="1.0.0")
    _check(version="1.0.0", allow_downgrade=True)
    with pytest.raises(PolicyError, match="was rolled back on this device before"):
        _check(failed=["2.0.0"])
    assert floor_of("1.0.0", "1.2.0") == Version.parse("1.2.0")
    assert floor_of(None, None) is None


# -- chunks ---------------------------------------------------------------------------------
def test_chunked_stream_round_trip_with_window_dictionary(tmp_path):
    img = tmp_path / "img"
    block = os.urandom(64 << 10)
    img.write_bytes(block * 6 + os.urandom(1000))  # repeats only reachable across chunks
    out = tmp_path / "img.zst"
    res = compress_image(img, out, level=3, chunk_size=64 << 10, window=128 << 10, threads=2)
    stream = out.read_bytes()
    assert len(stream) == res.compressed_size < 3 * len(block)  # the window made repeats cheap
    rebuilt = bytearray()
    for i, ch in enumerate(res.chunks):
        data = stream[ch.offset: ch.offset + ch.length]
        verify_chunk(i, ch, data)
        lo = max(0, ch.out_offset - 128 * 1024)
        rebuilt += decompress_chunk(i, ch, data, bytes(rebuilt[lo:ch.out_offset]) or None)
    assert hashlib.sha256(rebuilt).hexdigest() == res.sha256 == hashlib.sha256(img.read_bytes()).hexdigest()


def test_chunk_verification_rejects_before_decompressing():
    payload = b"x" * 1000
    frame = zstandard.ZstdCompressor().compress(payload)
    ch = Chunk(0, len(frame), hashlib.sha256(frame).hexdigest(), 0, 1000, hashlib.sha256(payload).hexdigest())
    verify_chunk(0, ch, frame)
    with pytest.raises(ChunkError, match="sha256 mismatch"):
        verify_chunk(0, ch, frame[:-1] + bytes([frame[-1] ^ 1]))
    with pytest.raises(ChunkError, match="bytes, the manifest says"):
        verify_chunk(0, ch, frame + b"x")
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 10_000_000)
    big = Chunk(0, len(bomb), hashlib.sha256(bomb).hexdigest(), 0, 1000, H)
    with pytest.raises(ChunkError, match="declares 10000000 decompressed bytes"):
        decompress_chunk(0, big, bomb, None)


# -- boot entries and the systemd-boot model --------------------------------------------------
def test_entry_names():
    e = parse_entry("abflip-2.0.0-rc.1-b+2-1.conf")
    assert (e.version, e.slot, e.tries_left, e.tries_done) == ("2.0.0-rc.1", "b", 2, 1)
    assert blessed_name(e) == "abflip-2.0.0-rc.1-b.conf"
    assert parse_entry("abflip-1.0.0-a.conf").counting is False
    assert parse_entry("abflip-1.0.0-b+0-3.conf").exhausted
    assert parse_entry("debian.conf") is None
    assert new_entry("3.0.0", "a", 3).name == "abflip-3.0.0-a+3.conf"


def _model(name, version, sort_key="abflip"):
    text = entry_text(product="p", version=version, slot="a", partlabel="root-a", options="", has_initrd=False)
    if sort_key is None:
        text = text.replace("sort-key abflip\n", "")
    return parse_loader_entry(name, text)


def test_model_orders_by_version_and_puts_exhausted_last():
    old, new = _model("abflip-1.0.0-a.conf", "1.0.0"), _model("abflip-2.0.0-b+3.conf", "2.0.0")
    assert select_entry([old, new]) is new
    spent = _model("abflip-2.0.0-b+0-3.conf", "2.0.0")
    assert select_entry([old, spent]) is old
    # without sort-key on every entry, version does not order: the id does (descending)
    a, b = _model("zz-1.0.0.conf", "1.0.0", None), _model("aa-9.0.0.conf", "9.0.0", None)
    assert select_entry([a, b]) is a
    # an entry with a sort-key goes before one without
    assert select_entry([_model("zz.conf", "1", None), old]) is old
