"""Long-range mode (issue 14): a dictionary window larger than the chunk finds repeats up to the
window apart, the manifest records it (``compression.window``), and a device whose memory
budget cannot hold it refuses the release before downloading anything."""

from __future__ import annotations

import random

import pytest

from abflip.demo import HARDWARE, PRODUCT
from abflip.sim import SimDevice
from applier.agent import Device
from applier.stream import memory_needed, page_cache_needed
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


def test_a_window_beyond_the_chunk_finds_far_repeats_and_is_recorded(tmp_path):
    """Long-distance matching over the prefix (as ``zstd --long``) finds the repeats a window
    of one chunk cannot reach; the manifest records the window used."""
    image = _long_range_image(tmp_path / "lr.img")
    near = _release(tmp_path, image, "near", MIB)
    far = _release(tmp_path, image, "far", 8 * MIB)
    assert near.release.image.compression.window == MIB
    assert far.release.image.compression.window == 8 * MIB
    near_size = sum(c.length for c in near.release.image.chunks)
    far_size = sum(c.length for c in far.release.image.chunks)
    assert far_size < 0.6 * near_size, (far_size, near_size)  # the second copy costs almost nothing


@pytest.mark.parametrize("decoder", ["libzstd", "python"])
@pytest.mark.parametrize("budget", ["16M", "256M"])
def test_the_window_counts_against_the_budget_only_where_it_is_copied(world, tmp_path, budget, decoder, monkeypatch):
    """libzstd reads a wide window in place from the slot's page cache (file-backed, reclaimable:
    not counted in ``limits.memory``), so a 16 MiB budget installs a 16 MiB window; python-zstandard
    copies it (anonymous memory, counted), so the same budget refuses the release before download."""
    image = _long_range_image(tmp_path / "lr.img", 10 * MIB)
    rel = _release(tmp_path, image, "far", 16 * MIB)
    assert page_cache_needed(rel.release.image) == 16 * MIB
    if decoder == "python":
        monkeypatch.setattr(zstdlib, "LIB", None)
        # the dictionary copied, a chunk, the decoder's window, pieces
        assert 16 * MIB < memory_needed(rel.release.image) < 24 * MIB
    elif zstdlib.LIB is None:
        pytest.fail("no libzstd on this machine (Debian's libzstd1)")
    else:  # two chunks, pieces: the window is referenced where it lies
        assert 2 * MIB < memory_needed(rel.release.image) < 8 * MIB
    refused = decoder == "python" and budget == "16M"
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
