"""dm-verity (issue 22): the hash tree `release create --verity` computes, byte for byte what `veritysetup format`
writes; the manifest record every device parses with bounds; the tree streamed and verified with the image; the
boot entry that opens the root through it, from the signed manifest only; a UKI whose command line carries the
root hash, signed for Secure Boot.

The QEMU proofs (a verified root booting, a tampered block failing the boot or a read, a signed UKI under OVMF's
Secure Boot) are tests/e2e/test_verified_boot.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_agent_lifecycle import agent

from abflip.demo import HARDWARE, PRODUCT
from applier.bootloader import systemd_boot as boot
from builder.errors import BuildError
from builder.release import create_release
from builder.uki import SbsignSigner, pe_sections
from builder.verity import TAIL_NAME, default_salt, make_tree
from metadata.manifest import ManifestError, Release
from metadata.verity import BLOCK, Verity, kernel_args, level_blocks, tree_bytes

REPO = Path(__file__).resolve().parents[1]
VERITYSETUP = shutil.which("veritysetup") or ("/usr/sbin/veritysetup" if Path("/usr/sbin/veritysetup").exists() else None)
needs_veritysetup = pytest.mark.skipif(VERITYSETUP is None, reason="needs veritysetup (apt: cryptsetup-bin)")
STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
needs_uki_tools = pytest.mark.skipif(
    not STUB.is_file() or not shutil.which("objcopy") or not shutil.which("sbsign") or not shutil.which("sbverify"),
    reason="needs objcopy (apt: binutils), sbsign and sbverify (apt: sbsigntool), linuxx64.efi.stub (apt: "
           "systemd-boot-efi)")
SALT = "5a" * 32


def _veritysetup_format(data: Path, hash_file: Path, *extra: str) -> str:
    """`veritysetup format --no-superblock`: the reference tree into ``hash_file``; returns its root hash."""
    p = subprocess.run([VERITYSETUP, "format", "--no-superblock", "--salt", SALT, *extra, str(data), str(hash_file)],
                       capture_output=True, text=True, check=True)
    return next(line.split(":", 1)[1].strip() for line in p.stdout.splitlines() if line.startswith("Root hash"))


def _random(path: Path, size: int, seed: int) -> Path:
    out, x = bytearray(), hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        x = hashlib.sha256(x).digest()
        out += x * 128
    path.write_bytes(bytes(out[:size]))
    return path


# -- the tree -------------------------------------------------------------------------------------------------
@needs_veritysetup
@pytest.mark.parametrize("blocks, short", [(1, 0), (2, 100), (127, 0), (128, 1), (129, 4095), (16385, 7)])
def test_the_tree_is_veritysetups_byte_for_byte(tmp_path, blocks, short):
    """Our Python tree against cryptsetup's, for one block (no tree: the root hash is the block's digest), one
    level, a full and an overflowing hash block, three levels; images that end inside a block (zero-padded)."""
    image = _random(tmp_path / "image", blocks * BLOCK - short, blocks)
    v = make_tree(image, tmp_path / TAIL_NAME, SALT)
    tail = (tmp_path / TAIL_NAME).read_bytes()
    slot = image.read_bytes() + tail
    assert (v.data_blocks, v.hash_offset, len(slot)) == (blocks, blocks * BLOCK, v.image_size)
    assert len(level_blocks(blocks)) == {1: 0, 2: 1, 127: 1, 128: 1, 129: 2, 16385: 3}[blocks]
    padded = tmp_path / "padded"
    padded.write_bytes(slot[:v.hash_offset])
    assert slot[blocks * BLOCK - short:v.hash_offset] == b"\0" * short
    ref = tmp_path / "ref-tree"
    assert _veritysetup_format(padded, ref) == v.root_hash
    assert ref.read_bytes() == slot[v.hash_offset:] and len(slot) - v.hash_offset == tree_bytes(blocks)


@needs_veritysetup
def test_the_tree_in_the_slot_is_what_veritysetup_writes_after_the_data_and_verifies(tmp_path):
    """The slot's layout: data, then the tree at hash_offset on the same device, as `veritysetup format
    --hash-offset` lays it out; `veritysetup verify` with the manifest's parameters accepts it, and refuses it once
    one byte of the data changed."""
    image = _random(tmp_path / "image", 300 * BLOCK + 17, 3)
    v = make_tree(image, tmp_path / TAIL_NAME, SALT)
    ours = tmp_path / "slot"
    ours.write_bytes(image.read_bytes() + (tmp_path / TAIL_NAME).read_bytes())
    theirs = tmp_path / "theirs"
    theirs.write_bytes(ours.read_bytes()[:v.hash_offset])
    assert _veritysetup_format(theirs, theirs, f"--data-blocks={v.data_blocks}", f"--hash-offset={v.hash_offset}") \
        == v.root_hash
    assert theirs.read_bytes() == ours.read_bytes()
    args = [VERITYSETUP, "verify", "--no-superblock", f"--salt={v.salt}", f"--data-blocks={v.data_blocks}",
            f"--hash-offset={v.hash_offset}", "--hash=sha256", "--format=1", str(ours), str(ours), v.root_hash]
    subprocess.run(args, check=True, capture_output=True)
    with open(ours, "r+b") as f:
        f.seek(123 * BLOCK + 5)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    assert subprocess.run(args, capture_output=True).returncode != 0


def test_a_product_has_one_salt_so_unchanged_blocks_keep_their_digests(tmp_path):
    a = _random(tmp_path / "a", 200 * BLOCK, 1)
    b = tmp_path / "b"
    data = bytearray(a.read_bytes())
    data[150 * BLOCK] ^= 0xFF  # one block of the second hash block's range changes
    b.write_bytes(bytes(data))
    assert default_salt("edge-os") == default_salt("edge-os") != default_salt("other-os")
    ta, tb = (make_tree(p, tmp_path / f"{p.name}.tree", default_salt("edge-os")) for p in (a, b))
    la, lb = ((tmp_path / f"{n}.tree").read_bytes() for n in ("a", "b"))
    assert ta.root_hash != tb.root_hash
    # level 0 is last: the hash block of data blocks 0-127 is the same, that of 128-199 is not
    assert la[-2 * BLOCK:-BLOCK] == lb[-2 * BLOCK:-BLOCK] and la[-BLOCK:] != lb[-BLOCK:]


# -- the manifest ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def verity_release(tmp_path_factory, built) -> Path:
    """2.0.0's image, released with its tree (and the built fixture's kernel and initrd)."""
    out = tmp_path_factory.mktemp("verity") / "release-2.0.0"
    create_release(built["2.0.0.img"], out, product=PRODUCT, version="2.0.0", compatible=[HARDWARE],
                   kernel=built["2.0.0"] / "vmlinuz", initrd=built["2.0.0"] / "initrd.img", options="ro quiet",
                   chunk_size=256 << 10, window=256 << 10, piece_size=64 << 10, created=1700000000, verity=True)
    return out


def _decompress(release_dir: Path, release: Release, tmp: Path) -> bytes:
    from builder.delta import decompress_release_image

    p = decompress_release_image(release_dir, release, tmp)
    try:
        return p.read_bytes()
    finally:
        p.unlink()


def test_release_create_verity_streams_the_tree_with_the_image(verity_release, built, tmp_path):
    rel = Release.from_bytes((verity_release / "release.json").read_bytes())
    v = rel.image.verity
    image = built["2.0.0.img"].read_bytes()
    tail = (verity_release / TAIL_NAME).read_bytes()
    assert v is not None and (v.salt, v.hash_offset) == (default_salt(PRODUCT), -(-len(image) // BLOCK) * BLOCK)
    assert rel.image.size == v.image_size == len(image) + len(tail)
    stream = _decompress(verity_release, rel, tmp_path)
    assert stream == image + tail and hashlib.sha256(stream).hexdigest() == rel.image.sha256
    d = json.loads((verity_release / "release.json").read_text())
    assert sorted(d["image"]["verity"]) == ["data_block_size", "data_blocks", "format", "hash", "hash_block_size",
                                            "hash_offset", "root_hash", "salt"]
    if VERITYSETUP:  # the device's view: its slot as veritysetup opens it
        slot = tmp_path / "slot"
        slot.write_bytes(stream)
        subprocess.run([VERITYSETUP, "verify", "--no-superblock", f"--salt={v.salt}", f"--data-blocks={v.data_blocks}",
                        f"--hash-offset={v.hash_offset}", str(slot), str(slot), v.root_hash], check=True,
                       capture_output=True)


def test_the_tree_is_computed_beside_the_chunks_and_the_chunks_over_it_wait_for_it(built, tmp_path, monkeypatch):
    """release create computes the tree in a thread while the image's chunks compress: a tree that takes its time
    still ends up in the stream whole (the chunks that read it waited); a tree that fails stops the release, and
    nothing is left behind (no release directory, no staging directory)."""
    import threading
    import time as clock

    import builder.release as release_mod

    real = release_mod.make_tree
    seen: list[str] = []

    def slow(*a, **k):
        seen.append(threading.current_thread().name)
        clock.sleep(0.5)
        return real(*a, **k)

    monkeypatch.setattr(release_mod, "make_tree", slow)
    common = dict(product=PRODUCT, version="2.0.0", compatible=[HARDWARE], kernel=built["2.0.0"] / "vmlinuz",
                  chunk_size=256 << 10, window=256 << 10, piece_size=64 << 10, created=1700000000, verity=True)
    out = tmp_path / "slow"
    create_release(built["2.0.0.img"], out, **common)
    rel = Release.from_bytes((out / "release.json").read_bytes())
    assert seen == ["abflip-verity"] and len(rel.image.chunks) > 2
    image = built["2.0.0.img"].read_bytes()
    assert _decompress(out, rel, tmp_path) == image + (out / TAIL_NAME).read_bytes()
    ref = tmp_path / "ref.tree"
    assert make_tree(built["2.0.0.img"], ref, default_salt(PRODUCT)).root_hash == rel.image.verity.root_hash
    assert ref.read_bytes() == (out / TAIL_NAME).read_bytes()

    def broken(*a, **k):
        clock.sleep(0.2)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(release_mod, "make_tree", broken)
    with pytest.raises(OSError, match="Input/output error"):
        create_release(built["2.0.0.img"], tmp_path / "broken", **common)
    assert not (tmp_path / "broken").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".broken.")]


def test_a_release_without_verity_keeps_its_bytes(built):
    """No tree: no `verity` key, no tail file; the manifest as before issue 22, byte for byte."""
    d = json.loads((built["2.0.0"] / "release.json").read_text())
    assert "verity" not in d["image"] and not (built["2.0.0"] / TAIL_NAME).exists()
    assert Release.from_bytes((built["2.0.0"] / "release.json").read_bytes()).to_bytes() == \
        (built["2.0.0"] / "release.json").read_bytes()


def test_verity_release_is_reproducible(built, tmp_path):
    outs = []
    for n in (1, 2):
        out = tmp_path / f"r{n}"
        create_release(built["1.0.0.img"], out, product=PRODUCT, version="1.0.0", compatible=[HARDWARE],
                       kernel=built["1.0.0"] / "vmlinuz", chunk_size=256 << 10, created=1700000000, verity=True)
        outs.append(out)
    for name in ("release.json", "rootfs.img.zst", TAIL_NAME):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_an_image_key_a_device_does_not_know_is_ignored_so_older_devices_boot_verity_releases(verity_release):
    """How a device that predates issue 22 reads a verity release: the parser ignores image keys it does not know
    (this one's `verity` is such a key to it), and the slot it writes starts with the filesystem, so it boots the
    root unverified, as before."""
    d = json.loads((verity_release / "release.json").read_text())
    d["image"]["x-future"] = {"anything": 1}
    assert Release.from_bytes(json.dumps(d).encode()).image.verity is not None


@pytest.mark.parametrize("mutate, needle", [
    (lambda v: v.update(format=0), "format=0"),
    (lambda v: v.update(hash="sha1"), "hash='sha1'"),
    (lambda v: v.update(data_block_size=512), "data_block_size=512"),
    (lambda v: v.update(hash_block_size=True), "hash_block_size=True"),
    (lambda v: v.update(data_blocks=0), "data_blocks=0"),
    (lambda v: v.update(data_blocks=v["data_blocks"] + 1), "is not where the data ends"),
    (lambda v: v.update(hash_offset=v["hash_offset"] - BLOCK), "is not where the data ends"),
    (lambda v: v.update(salt="ZZ" * 32), "salt"),
    (lambda v: v.update(root_hash="00" * 31), "root_hash"),
    (lambda v: v.update(superblock=True), "unknown key"),
    (lambda v: v.pop("salt"), "salt"),
])
def test_a_hostile_verity_record_is_refused_by_the_device_parser(verity_release, mutate, needle):
    """A signer cannot make the device write an entry whose tree parameters do not describe the image: every key
    bounded, the tree exactly between the data and the end of the image, nothing unknown."""
    d = json.loads((verity_release / "release.json").read_text())
    mutate(d["image"]["verity"])
    with pytest.raises(ManifestError, match="release manifest is invalid") as e:
        Release.from_bytes(json.dumps(d).encode())
    assert needle in e.value.message and e.value.exit_code == 3


def test_the_image_size_must_hold_the_tree(verity_release):
    d = json.loads((verity_release / "release.json").read_text())
    blocks = d["image"]["verity"]["data_blocks"] - 1
    d["image"]["verity"].update(data_blocks=blocks, hash_offset=blocks * BLOCK)
    with pytest.raises(ManifestError, match="image.size is"):
        Release.from_bytes(json.dumps(d).encode())


# -- the device -------------------------------------------------------------------------------------------------
def test_the_device_installs_a_verity_release_and_its_entry_opens_the_root_through_the_tree(world, verity_release,
                                                                                            built):
    """v1 without a tree, v2 with one (a product moving to verified boot): the device streams data and tree into
    slot b, verifies both, and its entry names the mapping and the tree's parameters from the signed manifest,
    with slot b as the data device; the release's own options come after them."""
    from builder.publish import publish_release

    world.publish("1.0.0")
    sim, dev = agent(world)
    publish_release(verity_release, world.storage, world.keys, channel="stable")
    dev.install()
    rel = Release.from_bytes((verity_release / "release.json").read_bytes())
    v = rel.image.verity
    want = built["2.0.0.img"].read_bytes() + (verity_release / TAIL_NAME).read_bytes()
    assert sim.slot_path("b").read_bytes()[:len(want)] == want
    [entry] = [e for e in sim.entries() if "-b+" in e]
    options = next(line for line in (sim.esp / "loader" / "entries" / entry).read_text().splitlines()
                   if line.startswith("options "))
    assert options == (f"options root=/dev/mapper/abflip-root abflip.verity={v.root_hash} abflip.verity.salt={v.salt} "
                       f"abflip.verity.data_blocks={v.data_blocks} abflip.verity.hash_offset={v.hash_offset} "
                       f"abflip.verity.data=PARTLABEL=root-b abflip.slot=b ro quiet")
    assert sim.boot().slot == "b" and dev.boot_check()["state"] == "committed"


def test_a_delta_to_a_verity_release_rebuilds_data_and_tree(world, built, tmp_path):
    """Deltas go from slot to slot: from 1.0.0's image and tree to 2.0.0's; one salt per product keeps the tree
    blocks over unchanged data the same."""
    from builder.publish import publish_release

    r1, r2 = tmp_path / "v1", tmp_path / "v2"
    common = dict(product=PRODUCT, compatible=[HARDWARE], kernel=built["1.0.0"] / "vmlinuz", chunk_size=256 << 10,
                  window=256 << 10, created=1700000000, verity=True)
    create_release(built["1.0.0.img"], r1, version="1.0.0", **common)
    create_release(built["2.0.0.img"], r2, version="2.0.0", delta_from=[r1], **common)
    slot_image = tmp_path / "slot-1.0.0"
    slot_image.write_bytes(built["1.0.0.img"].read_bytes() + (r1 / TAIL_NAME).read_bytes())
    publish_release(r1, world.storage, world.keys, channel="stable")
    from abflip.sim import SimDevice
    from applier.agent import Device

    sim = SimDevice.create(world.tmp / "dv", repository_url=world.url,
                           trusted_root=(world.repo / "metadata" / "1.root.json").read_bytes(), product=PRODUCT,
                           hardware_id=HARDWARE, slot_size=8 << 20, retries=1, timeout=5.0)
    sim.provision(slot_image, slot="a", version="1.0.0", product=PRODUCT)
    dev = Device(sim.config)
    assert dev.provision(r1, force=True)["sha256"] == Release.from_bytes((r1 / "release.json").read_bytes()).image.sha256
    publish_release(r2, world.storage, world.keys, channel="stable")
    result = dev.install()
    assert result.kind == "delta"
    want = built["2.0.0.img"].read_bytes() + (r2 / TAIL_NAME).read_bytes()
    assert sim.slot_path("b").read_bytes()[:len(want)] == want


def test_the_entry_writer_checks_the_tree_again():
    """Defence in depth: a Verity record that did not come through the parser cannot put anything but its numbers
    and hex digits into the options line."""
    good = Verity(74, 74 * BLOCK, SALT, "ab" * 32)
    bad = dataclasses.replace(good, salt="00 init=/bin/sh")
    with pytest.raises(Exception, match="salt"):
        boot.entry_text(product="p", version="1.0.0", slot="b", partlabel="root-b", options="ro", has_initrd=True,
                        verity=dataclasses.replace(bad, data_blocks=74))
    assert "abflip.verity.data=PARTLABEL=root-b abflip.slot=b ro" in boot.entry_text(
        product="p", version="1.0.0", slot="b", partlabel="root-b", options="ro", has_initrd=True,
        verity=dataclasses.replace(good, data_blocks=1, hash_offset=BLOCK))


@pytest.mark.parametrize("slaves, blessed", [(["slot"], True), (["other"], False), (["slot", "other"], False)])
def test_boot_check_takes_a_verity_mapping_on_the_entrys_slot_alone_for_that_slot(world, tmp_path, slaves, blessed):
    """A verity root is /dev/mapper/abflip-root, not the slot: boot-check reads the mapping's lower devices from
    sysfs and blesses the trial only if they are the entry's slot and nothing else."""
    from applier.config import SlotConfig
    from metadata.errors import DeviceError

    world.publish("1.0.0")
    sim, dev = agent(world)
    loop = subprocess.run(["losetup", "--find", "--show", str(sim.slot_path("b"))], capture_output=True, text=True)
    if loop.returncode != 0:
        pytest.skip("needs a loop device (root, losetup)")
    loop_dev = loop.stdout.strip()
    try:
        rdev = os.stat(loop_dev).st_rdev
        cfg = dev.config
        dev.config = dataclasses.replace(cfg, slots={**cfg.slots, "b": SlotConfig("b", Path(loop_dev), "root-b")})
        root_dev = os.stat(tmp_path).st_dev  # what / is "mounted from" here: stands for /dev/dm-0
        sysfs = tmp_path / "sys-dev-block"
        for n, name in enumerate(slaves):
            d = sysfs / f"{os.major(root_dev)}:{os.minor(root_dev)}" / "slaves" / f"dev{n}"
            d.mkdir(parents=True)
            (d / "dev").write_text(f"{os.major(rdev)}:{os.minor(rdev)}\n" if name == "slot" else "7:250\n")
        dev.ctx = dataclasses.replace(dev.ctx, root=tmp_path, sys_block=sysfs)
        world.publish("2.0.0")
        dev.install()
        assert sim.boot().slot == "b"
        if blessed:
            assert dev.boot_check()["state"] == "committed"
        else:
            with pytest.raises(DeviceError, match="is not slot b .* nor a mapping on it alone"):
                dev.boot_check()
            assert sim.boot().slot == "a"
    finally:
        subprocess.run(["losetup", "-d", loop_dev], check=False)


# -- refusals at release create -------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "abflip.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


@pytest.mark.parametrize("extra, needle", [
    (["--build-uki"], "--build-uki needs --verity"),
    (["--verity", "--build-uki", "--uki", "K"], "exactly one of --kernel and --uki"),
    (["--verity", "--secure-boot-key", "KEY"], "--secure-boot-key and --secure-boot-cert go together"),
    (["--verity", "--secure-boot-key", "KEY", "--secure-boot-cert", "CERT"], "there is none in this release"),
    (["--verity", "--build-uki", "--secure-boot-key", "MISSING", "--secure-boot-cert", "CERT"],
     "--secure-boot-key MISSING does not exist"),
    (["--verity", "--options", "ro abflip.verity=00"], "'abflip.verity'"),
    (["--verity", "--options", "ro rd.dm_mod.create=root,,,ro,0"], "'rd.dm_mod.create' (dm-mod.*)"),
])
def test_release_create_refuses_what_cannot_boot_verified_and_writes_nothing(built, tmp_path, extra, needle):
    out = tmp_path / "out"
    files = {"K": built["1.0.0"] / "vmlinuz", "KEY": tmp_path / "db.key", "CERT": tmp_path / "db.crt",
             "MISSING": tmp_path / "missing.key"}
    files["KEY"].write_text("key")
    files["CERT"].write_text("cert")
    args = ["release", "create", "--image", str(built["1.0.0.img"]), "--product", PRODUCT, "--version", "1.0.0",
            "--compatible", HARDWARE, "--kernel", str(built["1.0.0"] / "vmlinuz"), "-o", str(out),
            *[str(files.get(a, a)) for a in extra]]
    r = _cli(*args)
    assert r.returncode == 2 and "error (user):" in r.stderr and "hint:" in r.stderr, r.stderr
    assert needle.replace("MISSING", str(files["MISSING"])) in r.stderr, r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# -- the UKI ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def db_key(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("sb")
    for name in ("db", "other"):
        subprocess.run(["openssl", "req", "-quiet", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                        "-days", "3650", "-subj", f"/CN=abflip test {name}/", "-keyout", str(d / f"{name}.key"),
                        "-out", str(d / f"{name}.crt")], check=True, capture_output=True)
    return d / "db.key", d / "db.crt"


def _section(data: bytes, name: str) -> bytes:
    import struct

    pe = struct.unpack_from("<I", data, 0x3C)[0]
    count, opt = struct.unpack_from("<H", data, pe + 6)[0], struct.unpack_from("<H", data, pe + 20)[0]
    for i in range(count):
        off = pe + 24 + opt + 40 * i
        if data[off:off + 8].rstrip(b"\0").decode() == name:
            vsize, _, rsize, raw = struct.unpack_from("<IIII", data, off + 8)
            return data[raw:raw + min(vsize, rsize)]
    raise KeyError(name)


@needs_uki_tools
def test_build_uki_carries_the_root_hash_and_is_signed_by_the_db_key(built, tmp_path, db_key):
    """`--build-uki`: the stub's sections, then .osrel, .cmdline (the verity words without the slot, then the
    release's options), .linux and .initrd, each at a fresh 4 KiB address; signed, it verifies against the db
    certificate and no other; the release boots it (boot.uki), not a kernel."""
    key, cert = db_key
    out = tmp_path / "rel"
    r = create_release(built["1.0.0.img"], out, product=PRODUCT, version="1.0.0", compatible=[HARDWARE],
                       kernel=built["1.0.0"] / "vmlinuz", initrd=built["1.0.0"] / "initrd.img", options="ro quiet",
                       chunk_size=256 << 10, created=1700000000, verity=True, build_uki=True,
                       signer=SbsignSigner(key, cert)).release
    assert sorted(p.name for p in out.iterdir()) == ["release.json", "rootfs.img.zst", TAIL_NAME, "uki.efi"]
    assert r.boot.kernel is None and r.boot.uki is not None and r.boot.options == "ro quiet"
    data = (out / "uki.efi").read_bytes()
    assert hashlib.sha256(data).hexdigest() == r.boot.uki.sha256
    sections = pe_sections(data)
    names = [n for n, _, _ in sections]
    assert names[-4:] == [".osrel", ".cmdline", ".linux", ".initrd"]
    addrs = [va for _, va, _ in sections]
    assert addrs == sorted(addrs) and all(va % 4096 == 0 for va in addrs[-4:])
    assert _section(data, ".cmdline").decode() == f"{kernel_args(r.image.verity)} ro quiet"
    assert "abflip.verity.data=" not in _section(data, ".cmdline").decode()
    assert _section(data, ".linux") == (built["1.0.0"] / "vmlinuz").read_bytes()
    assert _section(data, ".initrd") == (built["1.0.0"] / "initrd.img").read_bytes()
    assert b"VERSION_ID=1.0.0" in _section(data, ".osrel")
    assert subprocess.run(["sbverify", "--cert", str(cert), str(out / "uki.efi")], capture_output=True).returncode == 0
    other = key.parent / "other.crt"
    assert subprocess.run(["sbverify", "--cert", str(other), str(out / "uki.efi")], capture_output=True).returncode != 0


@needs_uki_tools
def test_an_unsigned_uki_is_built_without_a_key_and_sbverify_refuses_it(built, tmp_path, db_key):
    out = tmp_path / "rel"
    create_release(built["1.0.0.img"], out, product=PRODUCT, version="1.0.0", compatible=[HARDWARE],
                   kernel=built["1.0.0"] / "vmlinuz", chunk_size=256 << 10, created=1700000000, verity=True,
                   build_uki=True)
    assert ".initrd" not in [n for n, _, _ in pe_sections((out / "uki.efi").read_bytes())]
    r = subprocess.run(["sbverify", "--cert", str(db_key[1]), str(out / "uki.efi")], capture_output=True, text=True)
    assert r.returncode != 0


@needs_uki_tools
def test_a_signer_that_fails_leaves_nothing(built, tmp_path, db_key):
    class Refusing:
        def sign(self, unsigned: Path, signed: Path) -> None:
            raise BuildError("the KMS said no")

    out = tmp_path / "rel"
    with pytest.raises(BuildError, match="the KMS said no"):
        create_release(built["1.0.0.img"], out, product=PRODUCT, version="1.0.0", compatible=[HARDWARE],
                       kernel=built["1.0.0"] / "vmlinuz", chunk_size=256 << 10, created=1700000000, verity=True,
                       build_uki=True, signer=Refusing())
    assert list(tmp_path.iterdir()) == []


def test_the_slot_under_a_verity_root_is_the_booted_one_when_nothing_else_says(tmp_path):
    """A signed UKI's own command line names no slot (it cannot know it), nor does a factory's entry: abflip then
    takes the booted slot from the root filesystem's device, the slot a verity mapping is stacked on."""
    from applier.bootloader.esp import DirectoryEsp
    from applier.context import Context
    from metadata.errors import DeviceError

    backing = tmp_path / "slot-a.img"
    backing.write_bytes(b"\0" * (1 << 20))
    loop = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True)
    if loop.returncode != 0:
        pytest.skip("needs a loop device (root, losetup)")
    loop_dev = loop.stdout.strip()
    try:
        (tmp_path / "efivars").mkdir()
        (tmp_path / "esp" / "loader" / "entries").mkdir(parents=True)
        cmdline = tmp_path / "cmdline"
        cmdline.write_text(f"{kernel_args(Verity(74, 74 * BLOCK, SALT, 'ab' * 32))} ro quiet\n")
        root = tmp_path / "root"
        root.mkdir()
        root_dev, rdev = os.stat(root).st_dev, os.stat(loop_dev).st_rdev
        slaves = tmp_path / "sys" / f"{os.major(root_dev)}:{os.minor(root_dev)}" / "slaves" / "loop"
        ctx = Context(cmdline=cmdline, efivars=tmp_path / "efivars", root=root, sys_block=tmp_path / "sys")
        bl = boot.SystemdBoot(DirectoryEsp(tmp_path / "esp"), ctx, {"a": "root-a", "b": "root-b"},
                              {"a": Path(loop_dev), "b": tmp_path / "missing"})
        with pytest.raises(DeviceError, match="no slot under the root"):
            bl.booted_slot()
        slaves.mkdir(parents=True)
        (slaves / "dev").write_text(f"{os.major(rdev)}:{os.minor(rdev)}\n")
        assert bl.booted_slot() == "a"
        cmdline.write_text("root=/dev/mapper/abflip-root abflip.slot=b\n")  # what the entry says comes first
        assert bl.booted_slot() == "b"
    finally:
        subprocess.run(["losetup", "-d", loop_dev], check=False)
