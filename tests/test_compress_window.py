"""Long-range mode (issue 14): a dictionary window larger than the chunk finds repeats up to the
window apart, the manifest records it (``compression.window``), and a device whose memory
budget cannot hold it refuses the release before downloading anything."""

from __future__ import annotations

import random

import pytest

from abflip.demo import HARDWARE, PRODUCT
from abflip.sim import SimDevice
from applier.agent import Device
from applier.stream import memory_needed
from builder.publish import publish_release
from builder.release import create_release
from metadata import zstdlib
from metadata.errors import PolicyError

MIB = 1 << 20


def _long_range_image(path, half=4 * MIB):
    """``half`` bytes of compressible text, then the same again: repeats ``half`` apart, farther
    than zstd level 3 indexes by default (1 MiB)."""
    rng = random.Random(7)
    words = [bytes(rng.choice(b"abcdefghijklmnop") for _ in range(rng.randint(3, 9))) for _ in range(3000)]
    block = bytearray()
    while len(block) < half:
        block += b" ".join(rng.choice(words) for _ in range(500)) + rng.randbytes(1500)
    path.write_bytes(bytes(block[:half]) * 2)
    return path


def _release(tmp_path, image, name, window):
    (tmp_path / "vmlinuz").write_bytes(b"kernel " * 100)
    return create_release(image, tmp_path / name, product=PRODUCT, version="2.0.0", compatible=[HARDWARE],
                          kernel=tmp_path / "vmlinuz", options="ro", level=3, chunk_size=MIB, window=window,
                          created=1700000000)


@pytest.mark.parametrize("producer", ["libzstd", "python"])
def test_a_window_beyond_the_chunk_finds_far_repeats_and_is_recorded(tmp_path, producer, monkeypatch):
    """With libzstd: long-distance matching over a referenced prefix; without: python-zstandard's
    hash table raised until it indexes the whole window."""
    if producer == "python":
        monkeypatch.setattr(zstdlib, "LIB", None)
    elif zstdlib.LIB is None:
        pytest.skip("no libzstd on this machine")
    image = _long_range_image(tmp_path / "lr.img")
    near = _release(tmp_path, image, "near", MIB)
    far = _release(tmp_path, image, "far", 8 * MIB)
    assert near.release.image.compression.window == MIB
    assert far.release.image.compression.window == 8 * MIB
    near_size = sum(c.length for c in near.release.image.chunks)
    far_size = sum(c.length for c in far.release.image.chunks)
    assert far_size < 0.6 * near_size, (far_size, near_size)  # the second copy costs almost nothing


@pytest.mark.parametrize("decoder", ["libzstd", "python"])
@pytest.mark.parametrize("budget, refused", [("16M", True), ("256M", False)])
def test_a_device_whose_budget_cannot_hold_the_window_refuses_before_download(world, tmp_path, budget, refused,
                                                                             decoder, monkeypatch):
    image = _long_range_image(tmp_path / "lr.img", 10 * MIB)
    rel = _release(tmp_path, image, "far", 16 * MIB)  # made with libzstd's long-distance matching where it is
    if decoder == "python":
        monkeypatch.setattr(zstdlib, "LIB", None)
        # the window twice (the dictionary, and the slot's page cache it is copied from), a chunk, the decoder, pieces
        assert 32 * MIB < memory_needed(rel.release.image) < 40 * MIB
    elif zstdlib.LIB is None:
        pytest.skip("no libzstd on this machine")
    else:  # the window once (mapped from the slot, referenced in place), two chunks, pieces
        assert 16 * MIB < memory_needed(rel.release.image) < 24 * MIB
    publish_release(rel.dir, world.storage, world.keys, channel="stable")
    sim = SimDevice.create(tmp_path / "dev", repository_url=world.url,
                           trusted_root=(world.repo / "metadata" / "1.root.json").read_bytes(), product=PRODUCT,
                           hardware_id=HARDWARE, slot_size=24 * MIB, retries=1, timeout=5.0,
                           extra=f'[limits]\nmemory = "{budget}"\n')
    sim.provision(world.built["1.0.0.img"], slot="a", version="1.0.0", product=PRODUCT)
    dev = Device(sim.config)
    dev.mark_good()
    if not refused:  # every chunk's dictionary spans the chunks before it: mapped from the slot
        assert dev.install().version == "2.0.0"
        with open(sim.slot_path("b"), "rb") as f:
            assert f.read(rel.release.image.size) == image.read_bytes()
        return
    with pytest.raises(PolicyError, match="needs about .* MiB of memory") as e:
        dev.install()
    assert "16 MiB window" in e.value.message
    assert not (sim.state_dir / "staged").exists() or not any((sim.state_dir / "staged").iterdir())
    assert dev.status()["pending_entry"] is None
