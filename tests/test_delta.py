"""Delta updates (issue 12): a release carries a delta from an earlier one; a device whose booted
slot holds that earlier image downloads the delta instead of the full image, over real HTTP,
through the same verify -> decompress -> write path. Bad deltas are told apart from good ones:
each is a clear error or a fallback to the full image, never a flipped slot that did not verify.

The images are built here from generated files (offline): 1.0.0, and 1.1.0 = 1.0.0 with two
files patched (a "security fix"), one file moved to another directory and one file added.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import World, _Dispatch
from helpers import assert_untouched

from abflip.demo import HARDWARE, PRODUCT
from abflip.httpserver import RepoHandler, Server
from abflip.sim import SimDevice
from applier.agent import Device
from builder.errors import BuildError
from builder.image import build_image
from builder.release import create_release
from metadata.delta import Delta, DeltaError, DeltaLimits, chunks_digest
from metadata.errors import RepositoryError
from metadata.manifest import Release

REPO = Path(__file__).resolve().parents[1]
CHUNK = 256 << 10


def _tree(root: Path, version: str, *, security: bool = False) -> Path:
    rng = random.Random(12)
    shutil.rmtree(root, ignore_errors=True)
    for d in ("etc", "usr/lib", "usr/share/a", "usr/share/b"):
        (root / d).mkdir(parents=True)
    (root / "etc" / "os-release").write_text(f'NAME="{PRODUCT}"\nVERSION_ID="{version}"\n')
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(1500)]
    for i in range(24):
        n = 60_000 + rng.randint(0, 60_000)
        data = b" ".join(rng.choice(words) for _ in range(n // 5))[:n] + rng.randbytes(n // 3)
        if security and i in (5, 17):  # a patched library: a few bytes differ in the middle
            data = data[:n // 2] + b"CVE-FIX" + data[n // 2 + 7:]
        where = "usr/lib"
        if i == 20:  # a file that moved in the new release (same bytes, elsewhere in the image)
            where = "usr/share/b" if security else "usr/share/a"
        (root / where / f"lib{i:03d}.so").write_bytes(data)
    if security:
        (root / "usr" / "share" / "a" / "NEWS").write_bytes(b"fixed CVE-0000-0000\n" * 200)
    return root


@pytest.fixture(scope="module")
def dbuilt(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("delta")
    kernel = base / "vmlinuz"
    kernel.write_bytes(b"kernel " * 500)
    initrd = base / "initrd.img"
    initrd.write_bytes(b"initrd " * 500)
    out: dict[str, Path] = {"kernel": kernel, "initrd": initrd}
    for v, sec, frm in (("1.0.0", False, []), ("1.1.0", True, ["1.0.0"])):
        img = build_image(_tree(base / f"tree-{v}", v, security=sec), base / f"{v}.erofs", source_date_epoch=1700000000)
        create_release(img.path, base / f"release-{v}", product=PRODUCT, version=v, compatible=[HARDWARE],
                       kernel=kernel, initrd=initrd, options="ro", chunk_size=CHUNK, window=CHUNK, created=1700000000,
                       delta_from=[out[f] for f in frm])
        out[v] = base / f"release-{v}"
        out[f"{v}.img"] = img.path
    return out


@pytest.fixture
def dworld(tmp_path, dbuilt):
    w = World(tmp_path, dbuilt)
    server = Server(w.repo, handler=_Dispatch)
    _Dispatch.world = w
    w.server = server
    with server:
        yield w


def provisioned(w: World, name: str = "dev", *, flash: str = "1.0.0") -> tuple[SimDevice, Device]:
    """A device flashed with ``flash`` and provisioned (so it knows its image's sha256)."""
    sim = SimDevice.create(w.tmp / name, repository_url=w.url,
                           trusted_root=(w.repo / "metadata" / "1.root.json").read_bytes(),
                           product=PRODUCT, hardware_id=HARDWARE, slot_size=8 << 20, retries=1, timeout=5.0)
    with open(w.built[f"{flash}.img"], "rb") as src, open(sim.slot_path("a"), "r+b") as dst:
        shutil.copyfileobj(src, dst)
    dev = Device(sim.config)
    dev.provision(w.built[flash])
    sim.boot()
    return sim, Device(sim.config)


def slot_is(sim: SimDevice, slot: str, image: Path) -> bool:
    want = image.read_bytes()
    with open(sim.slot_path(slot), "rb") as f:
        return f.read(len(want)) == want


def release(d: Path) -> Release:
    return Release.from_bytes((d / "release.json").read_bytes())


def altered(w: World, name: str, edit_delta=None, edit_release=None) -> Path:
    """A copy of release 1.1.0 with its delta manifest and/or release.json edited (the references
    kept consistent, as a compromised signer would), to publish in place of the real one."""
    src = w.built["1.1.0"]
    d = w.tmp / name
    shutil.copytree(src, d)
    rj = json.loads((d / "release.json").read_text())
    if edit_delta is not None:
        mpath = d / "delta-1.0.0.json"
        dm = json.loads(mpath.read_text())
        edit_delta(dm)
        data = (json.dumps(dm) + "\n").encode()
        mpath.write_bytes(data)
        rj["deltas"][0]["manifest"].update(sha256=hashlib.sha256(data).hexdigest(), length=len(data))
    if edit_release is not None:
        edit_release(rj)
    (d / "release.json").write_text(json.dumps(rj, indent=1, sort_keys=True) + "\n")
    return d


def sign_raw(w: World, d: Path) -> None:
    """Upload and sign a release directory as a hostile signer would: no checks at all."""
    from tuf.api.metadata import TargetFile

    from builder.publish import IMMUTABLE, commit, load_tagged, target_key
    from metadata.manifest import Channel, channel_target_path

    rj = json.loads((d / "release.json").read_text())
    tdir = f"{PRODUCT}/releases/{rj['version']}"
    repo, tag = load_tagged(w.storage)
    for f in d.iterdir():
        t = TargetFile.from_file(f"{tdir}/{f.name}", str(f), ["sha256"])
        w.storage.put_file(target_key(t), f, content_type="application/octet-stream", cache_control=IMMUTABLE)
        repo.add_target(t)
    pointer = Channel(PRODUCT, "stable", Release.from_bytes((w.built["1.1.0"] / "release.json").read_bytes()).version,
                      f"{tdir}/release.json").to_bytes()
    t = TargetFile.from_data(channel_target_path(PRODUCT, "stable"), pointer, ["sha256"])
    w.storage.put(target_key(t), pointer, content_type="application/json", cache_control=IMMUTABLE)
    repo.add_target(t)
    assert commit(w.storage, w.keys, repo, tag)


def publish_dir(w: World, d: Path):
    from builder.publish import publish_release

    return publish_release(d, w.storage, w.keys, channel="stable")


# -- the producer ---------------------------------------------------------------------------------
def test_release_carries_a_small_verified_delta(dbuilt):
    rel = release(dbuilt["1.1.0"])
    (ref,) = rel.deltas
    assert ref.source.version == "1.0.0" and ref.source.sha256 == release(dbuilt["1.0.0"]).image.sha256
    delta = Delta.from_bytes((dbuilt["1.1.0"] / "delta-1.0.0.json").read_bytes())
    assert delta.matches(ref, rel.image, PRODUCT, "1.1.0") is None
    assert len(delta.ops) == len(rel.image.chunks)
    total = ref.data.length + ref.manifest.length
    assert total < rel.image.compressed_size / 10, (total, rel.image.compressed_size)
    assert any(op.frame is not None for op in delta.ops)  # the patched files
    assert any(op.copy and op.frame is None for op in delta.ops)  # unchanged chunks: copied


def test_delta_frames_carry_their_content_checksum(dbuilt):
    """Each frame has zstd's content checksum, which the device's decoder checks: decoded against a
    dictionary byte that is not the source's, the frame fails at once (its chunk falls back there,
    not at the image's sha256 at the end)."""
    import zstandard

    from applier.stream import ChunkError, decompress_chunk
    from metadata.manifest import Chunk

    delta = Delta.from_bytes((dbuilt["1.1.0"] / "delta-1.0.0.json").read_bytes())
    data = (dbuilt["1.1.0"] / "delta-1.0.0.bin").read_bytes()
    source = dbuilt["1.0.0.img"].read_bytes()
    frames = [op for op in delta.ops if op.frame is not None]
    assert frames and all(zstandard.get_frame_parameters(data[op.frame.offset:]).has_checksum for op in frames)
    op = next(op for op in frames if op.dictionary)
    f = op.frame
    chunk = Chunk(f.offset, f.length, f.sha256, 0, f.size, f.out_sha256)
    dictionary = bytearray(b"".join(source[s:s + n] for s, n, _ in op.dictionary))
    frame = data[f.offset:f.offset + f.length]
    assert hashlib.sha256(decompress_chunk(0, chunk, frame, dictionary, check=False)).hexdigest() == f.out_sha256
    dictionary[len(dictionary) // 2] ^= 0xFF
    with pytest.raises(ChunkError, match="does not decompress"):
        decompress_chunk(0, chunk, frame, dictionary, check=False)


def test_release_create_delta_from_over_the_cli(dbuilt, tmp_path):
    out = tmp_path / "rel"
    r = subprocess.run([sys.executable, "-m", "abflip.cli", "release", "create", "--image", str(dbuilt["1.1.0.img"]),
                        "--product", PRODUCT, "--version", "1.1.0", "--compatible", HARDWARE,
                        "--kernel", str(dbuilt["kernel"]), "--chunk-size", str(CHUNK), "--window", str(CHUNK),
                        "--delta-from", str(dbuilt["1.0.0"]), "-o", str(out), "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["deltas"][0]["from"] == "1.0.0" and res["deltas"][0]["bytes"] < res["compressed_size"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("delta-")) == ["delta-1.0.0.bin",
                                                                                  "delta-1.0.0.json"]


@pytest.mark.parametrize("case", ["newer", "other-product", "missing"])
def test_release_create_refuses_a_bad_delta_source_before_any_work(dbuilt, tmp_path, case):
    src = dbuilt["1.0.0"]
    version, product = "1.1.0", PRODUCT
    if case == "newer":
        version = "0.9.0"
    elif case == "other-product":
        product = "other-os"
    else:
        src = tmp_path / "nowhere"
    out = tmp_path / "out"
    with pytest.raises(BuildError) as e:
        create_release(dbuilt["1.1.0.img"], out, product=product, version=version, compatible=[HARDWARE],
                       kernel=dbuilt["kernel"], chunk_size=CHUNK, window=CHUNK, delta_from=[src])
    assert "--delta-from" in e.value.message
    assert not out.exists() and not list(tmp_path.glob(".out.abflip-*"))


def test_publish_uploads_the_deltas_with_the_release(dworld):
    dworld.publish("1.0.0")
    dworld.publish("1.1.0")
    ref = release(dworld.built["1.1.0"]).deltas[0]
    for f in (ref.manifest, ref.data):
        assert hashlib.sha256(dworld.object(f.target).read_bytes()).hexdigest() == f.sha256


# -- the device -----------------------------------------------------------------------------------
def test_security_update_installs_through_the_delta(dworld):
    dworld.publish("1.1.0")
    sim, dev = provisioned(dworld)
    rel = release(dworld.built["1.1.0"])
    ref = rel.deltas[0]
    events = []
    dev.progress = events.append
    result = dev.install()
    assert (result.version, result.slot, result.kind, result.delta_from) == ("1.1.0", "b", "delta", "1.0.0")
    assert result.bytes_downloaded <= ref.data.length < rel.image.compressed_size / 10
    assert slot_is(sim, "b", dworld.built["1.1.0.img"])
    rec = dev.status()["download"]
    assert rec["kind"] == "delta" and rec["bytes_saved"] == rel.image.compressed_size - result.bytes_downloaded
    assert rec["chunks"]["fallback"] == 0 and rec["full_bytes"] == rel.image.compressed_size
    assert any(e.get("phase") == "delta" for e in events)
    assert sim.boot().slot == "b"
    assert dev.mark_good()["state"] == "committed"


def test_status_over_the_cli_says_delta_and_bytes_saved(dworld):
    dworld.publish("1.1.0")
    sim, dev = provisioned(dworld)
    r = subprocess.run([sys.executable, "-m", "abflip.cli", "download", "--config", str(sim.config_path), "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[-1]["event"] == "result" and events[-1]["result"]["kind"] == "delta"
    assert any(e.get("phase") == "delta" for e in events)
    r = subprocess.run([sys.executable, "-m", "abflip.cli", "status", "--config", str(sim.config_path), "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    st = json.loads(r.stdout)
    assert st["download"]["kind"] == "delta" and st["download"]["bytes_saved"] > 0


def test_device_that_does_not_know_its_image_downloads_the_full_image(dworld):
    dworld.publish("1.1.0")
    sim, dev = dworld.device(booted_version="1.0.0")  # factory image, no recorded sha256
    result = dev.install()
    assert result.kind == "full" and "sha256 is not recorded" in dev.status()["download"]["delta_note"]
    assert slot_is(sim, "b", dworld.built["1.1.0.img"])


def test_delta_for_another_source_is_not_used(dworld):
    d = altered(dworld, "other-source", edit_release=lambda rj: rj["deltas"][0]["source"].update(sha256="0" * 64))
    publish_dir(dworld, d)
    sim, dev = provisioned(dworld)
    result = dev.download()
    assert result.kind == "full" and result.delta_note == "no delta from the booted image"
    assert slot_is(sim, "b", dworld.built["1.1.0.img"])


def _copy_source(dbuilt) -> tuple[int, int]:
    delta = Delta.from_bytes((dbuilt["1.1.0"] / "delta-1.0.0.json").read_bytes())
    return next((i, op.copy[0][1]) for i, op in enumerate(delta.ops) if op.copy and op.frame is None and i > 0)


def test_source_bytes_that_differ_on_the_device_fall_back_to_that_chunk(dworld):
    dworld.publish("1.1.0")
    sim, dev = provisioned(dworld)
    _, offset = _copy_source(dworld.built)
    with open(sim.slot_path("a"), "r+b") as f:  # the booted slot's bytes differ from the delta's source
        f.seek(offset + 10)
        f.write(b"\xffbitrot\xff")
    result = dev.install()
    rec = dev.status()["download"]
    assert result.kind == "delta" and rec["fallback_chunks"] >= 1
    assert "differ from the delta's source" in rec["fallbacks"][0]
    assert slot_is(sim, "b", dworld.built["1.1.0.img"])


def _delta(dbuilt) -> Delta:
    return Delta.from_bytes((dbuilt["1.1.0"] / "delta-1.0.0.json").read_bytes())


def test_dictionary_bytes_that_differ_on_the_device_fall_back_to_that_chunk(dworld):
    """A frame decoded against dictionary bytes that are not the source's gives other bytes (or
    none): the image's sha256 catches it, the chunk is made again from the full image and the
    reason names the dictionary extent."""
    dworld.publish("1.1.0")
    sim, dev = provisioned(dworld)
    i, op = next((i, op) for i, op in enumerate(_delta(dworld.built).ops) if op.dictionary)
    src, n, _ = op.dictionary[0]
    with open(sim.slot_path("a"), "r+b") as f:
        f.seek(src + n // 2)
        f.write(b"\xffbitrot\xff")
    result = dev.install()
    rec = dev.status()["download"]
    assert result.kind == "delta" and rec["fallback_chunks"] >= 1
    assert any(r.startswith(f"chunk {i} dictionary extent 0") and "differ from the delta's source" in r
               for r in rec["fallbacks"]), rec["fallbacks"]
    assert slot_is(sim, "b", dworld.built["1.1.0.img"])


def test_a_chunk_from_the_full_image_decodes_against_checked_bytes_only(dworld):
    """Chunk j is written from booted-slot bytes that differ (not yet known: the image's sha256
    comes at the end); a later chunk k must come from the full image, whose frame decodes against
    the bytes before it. Those are checked one by one first, chunk j made again, and only then is
    chunk k decoded: the slot verifies, both chunks are told in the fallbacks."""
    ref = release(dworld.built["1.1.0"]).deltas[0]
    ops = _delta(dworld.built).ops
    j, offset = _copy_source(dworld.built)
    k = next(k for k in range(j + 1, len(ops)) if ops[k].frame is not None)
    dworld.publish("1.1.0")
    obj = dworld.object(ref.data.target)
    data = bytearray(obj.read_bytes())
    data[ops[k].frame.offset + ops[k].frame.length // 2] ^= 0xFF  # chunk k's frame, tampered on the mirror
    obj.write_bytes(bytes(data))
    sim, dev = provisioned(dworld)
    with open(sim.slot_path("a"), "r+b") as f:
        f.seek(offset + 10)
        f.write(b"\xffbitrot\xff")
    result = dev.install()
    rec = dev.status()["download"]
    assert result.kind == "delta" and rec["fallback_chunks"] >= 2
    assert any(r.startswith(f"chunk {k}: the delta's frame failed verification") for r in rec["fallbacks"])
    assert any(r.startswith(f"chunk {j} copy segment") and "differ from the delta's source" in r
               for r in rec["fallbacks"]), rec["fallbacks"]
    assert slot_is(sim, "b", dworld.built["1.1.0.img"])


def test_operation_hash_mismatch_falls_back_to_that_chunk(dworld):
    dworld.publish("1.1.0")
    ref = release(dworld.built["1.1.0"]).deltas[0]
    obj = dworld.object(ref.data.target)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the mirror serves a tampered frame
    obj.write_bytes(bytes(data))
    sim, dev = provisioned(dworld)
    dev.install()
    rec = dev.status()["download"]
    assert rec["fallback_chunks"] == 1 and rec["kind"] == "delta"
    assert "frame failed verification" in rec["fallbacks"][0]
    assert slot_is(sim, "b", dworld.built["1.1.0.img"])


def _first_copy(dm):
    return next(op for op in dm["ops"] if op["copy"])


def _out_of_bounds(dm):
    _first_copy(dm)["copy"][0][1] = dm["source"]["size"]


def _overlap(dm):
    dm["ops"][1]["out"][0] -= 4096


def _overlap_within(dm):
    op = next(op for op in dm["ops"] if len(op["copy"]) >= 2)
    op["copy"][1][0] = op["copy"][0][0]


def _other_target(dm):
    dm["target"]["sha256"] = "1" * 64


def _other_source(dm):
    dm["source"]["sha256"] = "2" * 64


def _dictionary_too_big(dm):
    dm["dictionary_max"] = DeltaLimits().max_dictionary + 1


@pytest.mark.parametrize("edit, why", [
    (_out_of_bounds, "outside the source"),
    (_overlap, "outputs overlap"),
    (_overlap_within, "overlaps the segment before it"),
    (_other_target, "is not this release's image"),
    (_other_source, "the delta manifest is from"),
    (_dictionary_too_big, "dictionary_max"),
])
def test_hostile_delta_manifest_is_refused_and_the_full_image_installs(dworld, edit, why):
    publish_dir(dworld, altered(dworld, edit.__name__, edit_delta=edit))
    sim, dev = provisioned(dworld)
    result = dev.install()
    note = dev.status()["download"]["delta_note"]
    assert result.kind == "full" and why in note, note
    assert slot_is(sim, "b", dworld.built["1.1.0.img"])
    assert sim.boot().slot == "b"


def test_delta_larger_than_the_full_image_is_refused_with_a_clear_error(dworld):
    full = release(dworld.built["1.1.0"]).image.compressed_size
    big = altered(dworld, "big", edit_release=lambda rj: rj["deltas"][0]["data"].update(length=full))
    with pytest.raises(BuildError, match="not smaller than the full image"):  # publish refuses it ...
        publish_dir(dworld, big)
    sign_raw(dworld, big)  # ... a compromised signer signs it anyway: the device refuses the release
    sim, dev = provisioned(dworld)
    with pytest.raises(RepositoryError) as e:
        dev.install()
    assert "not smaller than the full image" in e.value.message
    assert_untouched(sim, dev)


def test_delta_manifest_parser_bounds():
    with pytest.raises(DeltaError, match="more than"):
        Delta.from_bytes(b" " * (DeltaLimits().manifest_max_bytes + 1))
    with pytest.raises(DeltaError, match="not valid JSON"):
        Delta.from_bytes(b"{")
    assert chunks_digest(()) == hashlib.sha256(b"").hexdigest()


def test_delta_whose_target_manifest_differs_is_refused(dworld, dbuilt):
    """The delta of 1.1.0 served as a delta of another release (same source): refused by the
    target digest; the full image installs."""
    def retarget(dm):
        dm["target"]["chunks"] = "3" * 64
    publish_dir(dworld, altered(dworld, "retarget", edit_delta=retarget))
    sim, dev = provisioned(dworld)
    result = dev.download()
    assert result.kind == "full" and "is not this release's image" in result.delta_note


class _Counting(RepoHandler):
    sent: dict[str, int] = {}

    def send_bytes(self, data, start, end):
        RepoHandler.send_bytes(self, data, start, end)
        key = self.path.rsplit(".", 1)[-1]
        _Counting.sent[key] = _Counting.sent.get(key, 0) + end - start


class _Interrupted(BaseException):
    pass


def test_kill_and_resume_in_the_middle_of_a_delta_costs_at_most_one_chunk(dworld):
    dworld.publish("1.1.0")
    sim, dev = provisioned(dworld)
    rel = release(dworld.built["1.1.0"])
    delta = Delta.from_bytes((dworld.built["1.1.0"] / "delta-1.0.0.json").read_bytes())
    stop = next(i for i, op in enumerate(delta.ops) if op.frame is not None and i > 0)

    def progress(ev):
        if ev.get("phase") == "download" and ev.get("chunk") == stop:
            raise _Interrupted()

    with pytest.raises(_Interrupted):
        Device(sim.config, progress=progress).download()
    st = dev.status()
    assert st["state"] == "downloading" and st["target"]["chunks_done"] == stop
    dworld.handler = _Counting
    _Counting.sent = {}
    result = dev.download()
    assert result.kind == "delta" and result.resumed_at_chunk == stop
    left = sum(op.frame.length for op in delta.ops[stop:] if op.frame is not None)
    assert _Counting.sent.get("bin", 0) == left and _Counting.sent.get("zst", 0) == 0
    assert slot_is(sim, "b", dworld.built["1.1.0.img"])
    assert rel.image.sha256 == dev.status()["slots"]["b"]["sha256"]


def test_a_read_error_in_the_middle_of_a_copy_falls_back_after_part_of_the_chunk_was_written(dworld, monkeypatch):
    """A chunk of copies is written and hashed a step at a time as it is read; a read of the booted
    slot that fails after some steps makes the chunk come from the full image, and the image's hash
    (which took those steps) is taken again over the slot: it verifies."""
    import applier.delta as applier_delta
    from applier.slots import SlotDevice
    from metadata.errors import DeviceError

    dworld.publish("1.1.0")
    sim, dev = provisioned(dworld)
    j, offset = _copy_source(dworld.built)
    monkeypatch.setattr(applier_delta, "STEP", 4096)
    real = SlotDevice.pread_into

    def pread_into(self, at, into):
        if self.name == "a" and at == offset + 3 * 4096:
            raise DeviceError(f"reading slot a at byte {at} failed: [Errno 5] Input/output error")
        return real(self, at, into)

    monkeypatch.setattr(SlotDevice, "pread_into", pread_into)
    result = dev.install()
    rec = dev.status()["download"]
    assert result.kind == "delta" and rec["fallback_chunks"] == 1
    assert rec["fallbacks"][0].startswith(f"chunk {j} copy segment 0: reading slot a")
    assert slot_is(sim, "b", dworld.built["1.1.0.img"])


@pytest.mark.parametrize("where", ["write", "progress"])
def test_a_failure_in_the_middle_of_a_delta_stages_nothing_and_the_next_run_resumes(dworld, monkeypatch, where):
    """A write to the inactive slot that fails (main thread), or a progress save that fails (the
    hashing thread), in the middle of a delta install: a clear error, nothing staged, no entry for
    slot b, the device still boots slot a; the next run resumes and the slot verifies."""
    from applier.slots import SlotDevice
    from metadata.errors import DeviceError

    dworld.publish("1.1.0")
    sim, dev = provisioned(dworld)
    ops = _delta(dworld.built).ops
    bad = len(ops) // 2
    rel = release(dworld.built["1.1.0"])
    at = rel.image.chunks[bad].out_offset
    if where == "write":
        real = SlotDevice.pwrite

        def pwrite(self, offset, data):
            if self.name == "b" and offset == at:
                raise DeviceError(f"writing slot b at byte {offset} failed: [Errno 5] Input/output error")
            return real(self, offset, data)

        monkeypatch.setattr(SlotDevice, "pwrite", pwrite)
        failing = Device(sim.config)
    else:
        def progress(ev):
            if ev.get("phase") == "download" and ev.get("chunk") == bad:
                raise DeviceError("saving the progress failed: [Errno 28] No space left on device")

        failing = Device(sim.config, progress=progress)
    with pytest.raises(DeviceError) as e:
        failing.install()
    assert ("writing slot b" if where == "write" else "saving the progress") in str(e.value)
    st = dev.status()
    assert st["state"] == "downloading" and st["target"]["chunks_done"] <= bad
    assert_untouched(sim, dev)
    monkeypatch.undo()
    result = dev.install()
    assert result.kind == "delta" and 0 < result.resumed_at_chunk <= bad
    assert slot_is(sim, "b", dworld.built["1.1.0.img"])


# -- repository upkeep ----------------------------------------------------------------------------
def test_repo_verify_deep_checks_the_deltas(dworld):
    from abflip.audit import audit

    dworld.publish("1.0.0")
    dworld.publish("1.1.0")
    report = audit(str(dworld.repo), deep=True)
    assert report["ok"], report["problems"]
    assert report["channels"][0]["deltas"] == ["1.0.0"]
    ref = release(dworld.built["1.1.0"]).deltas[0]
    obj = dworld.object(ref.data.target)
    data = bytearray(obj.read_bytes())
    data[0] ^= 0xFF  # same length: only --deep can tell
    obj.write_bytes(bytes(data))
    assert audit(str(dworld.repo))["ok"]
    report = audit(str(dworld.repo), deep=True)
    assert not report["ok"] and "frame 0 fails its sha256" in report["problems"][0]


def test_gc_removes_deltas_whose_source_is_gone(dworld):
    from builder.gc import collect_garbage

    dworld.publish("1.0.0")
    dworld.publish("1.1.0")
    ref = release(dworld.built["1.1.0"]).deltas[0]
    kept = [dworld.object(ref.manifest.target), dworld.object(ref.data.target)]
    assert collect_garbage(dworld.storage, dworld.keys, keep=2).removed_targets == []  # the source is there: kept
    assert all(p.exists() for p in kept)
    result = collect_garbage(dworld.storage, dworld.keys, keep=1)
    assert result.removed_versions == {PRODUCT: ["1.0.0"]}
    assert ref.manifest.target in result.removed_targets and ref.data.target in result.removed_targets
    assert not any(p.exists() for p in kept)
    # a device that booted 1.0.0 still updates: the delta is gone from the targets, the full image installs
    sim, dev = provisioned(dworld)
    result = dev.install()
    assert result.kind == "full" and "not in the repository's signed targets" in dev.status()["download"]["delta_note"]
    assert slot_is(sim, "b", dworld.built["1.1.0.img"])
