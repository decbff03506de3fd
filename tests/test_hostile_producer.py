"""Hostile and careless producer inputs (issue 9, items 1-2 shared validators, 10-14).

Each test is a story: a careless release engineer, a hostile archive, a compromised signer or a
junk object in the repository tries something; abflip refuses it as the user's (exit 2) or the
repository's (ManifestError) fault, says what is wrong, never shows a traceback, and leaves
nothing half-made behind.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
from helpers import fake_erofs
from tuf.api.metadata import TargetFile

from abflip.demo import HARDWARE, PRODUCT, make_rootfs
from builder.errors import BuildError
from builder.publish import commit, load_tagged, target_key
from builder.release import create_release
from metadata.manifest import (
    DEVICE_OWNED_PARAMS,
    Channel,
    Limits,
    ManifestError,
    Release,
    boot_options_problem,
    kernel_params,
)

ABFLIP = [sys.executable, "-m", "abflip.cli"]
ROOT_AND_SETPRIV = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")


def _cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*ABFLIP, *args], capture_output=True, text=True, timeout=180, cwd=cwd,
                          env=None if env is None else {**os.environ, **env})


def _refused(r: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, `error (user): ...` naming the problem, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("error (user): "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """An image (any bytes behind an erofs superblock magic will do for 'release create') and a kernel."""
    (tmp_path / "rootfs.img").write_bytes(fake_erofs(os.urandom(64 << 10) * 3))
    (tmp_path / "vmlinuz").write_bytes(b"kernel " * 300)
    return {"image": tmp_path / "rootfs.img", "kernel": tmp_path / "vmlinuz", "out": tmp_path / "out"}


def _create(inputs: dict[str, Path], *extra: str, version: str = "1.0.0", product: str = PRODUCT):
    return _cli("release", "create", "--image", str(inputs["image"]), "--product", product, "--version", version,
                "--compatible", HARDWARE, "--kernel", str(inputs["kernel"]), "--chunk-size", str(64 << 10),
                "--window", str(64 << 10), "-o", str(inputs["out"]), *extra)


def _nothing_left(out: Path) -> None:
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    assert not [p for p in out.parent.iterdir() if ".abflip-" in p.name]


# -- release create: every argument checked up front with the device's rules (item 13) --------
@pytest.mark.parametrize("args, needle", [
    (("--chunk-size", "0"), "--chunk-size 0 is out of range"),
    (("--chunk-size", "-1"), "--chunk-size -1 is out of range"),
    (("--chunk-size", str((256 << 20) + 1)), "--chunk-size"),
    (("--threads", "-1"), "--threads -1 is out of range"),
    (("--level", "99"), "--level 99 is out of range"),
    (("--window", "-5"), "--window -5 is out of range"),
    (("--window", str((128 << 20) + 1)), "--window"),
])
def test_careless_engineer_gives_impossible_compression_numbers(inputs, args, needle):
    """Before: tracebacks (chunk size 0, threads -1), a release of 0 chunks (chunk size -1), or
    exit 0 and a failure only later, in publish, blamed on the repository (level 99, window -5)."""
    r = _create(inputs, *args)
    _refused(r, needle)
    _nothing_left(inputs["out"])


@pytest.mark.parametrize("hwid", ["bad id", "acme\n", "-" * 200])
def test_careless_engineer_gives_a_malformed_hardware_id(inputs, hwid):
    r = _cli("release", "create", "--image", str(inputs["image"]), "--product", PRODUCT, "--version", "1.0.0",
             "--compatible", hwid, "--kernel", str(inputs["kernel"]), "-o", str(inputs["out"]))
    _refused(r, "--compatible", "is malformed")
    _nothing_left(inputs["out"])


@pytest.mark.parametrize("options, needle", [
    ("ro\ninit=/bin/sh", "control"),
    ("quiet\refi /EFI/tools/shellx64.efi\roptions init=/bin/sh", "'\\r'"),
    ("ro\tquiet", "'\\t'"),
    ("ro " + "x" * 5000, "more than 1024"),
    ('ro console="ttyS0', "unbalanced double quote"),
    ("ro quiet\u00a0", "non-ASCII"),
])
def test_options_that_would_add_lines_to_the_boot_entry_are_refused(inputs, options, needle):
    """systemd-boot ends an entry line at \\r as well as \\n: one control character in the
    options would let the release add an `efi` line or a second `options` line."""
    r = _create(inputs, "--options", options)
    _refused(r, "--options", needle)
    _nothing_left(inputs["out"])


@pytest.mark.parametrize("options, owned", [
    ("ro root=PARTLABEL=root-a", "'root'"),
    ("abflip.slot=a ro", "'abflip.slot'"),
    ("ro mount.usr=PARTLABEL=root-a", "'mount.usr'"),
    ("ro rd.systemd.verity=0", "'rd.systemd.verity'"),
    ('ro "root=/dev/sda2"', "'root'"),
    ("ro systemd.mount-extra=PARTLABEL=root-a:/usr", "'systemd.mount-extra'"),
    ("ro roothash=00ff", "'roothash'"),
])
def test_release_cannot_name_the_slot_that_boots(inputs, options, owned):
    """The device writes `root=` and `abflip.slot=` first; the kernel and systemd take the last
    of repeated parameters, so a release setting them could boot root-a from slot b's entry."""
    r = _create(inputs, "--options", options)
    _refused(r, "which the device owns", owned)
    _nothing_left(inputs["out"])


def test_empty_image_and_empty_kernel_are_refused(inputs, tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    _refused(_cli("release", "create", "--image", str(empty), "--product", PRODUCT, "--version", "1.0.0",
                  "--compatible", HARDWARE, "--kernel", str(inputs["kernel"]), "-o", str(inputs["out"])),
             "the image is empty")
    _refused(_cli("release", "create", "--image", str(inputs["image"]), "--product", PRODUCT, "--version", "1.0.0",
                  "--compatible", HARDWARE, "--kernel", str(empty), "-o", str(inputs["out"])),
             "boot file vmlinuz is 0 bytes")
    _nothing_left(inputs["out"])


@pytest.mark.parametrize("product, version, needle", [
    ("Demo OS", "1.0.0", "is not a valid name"),
    ("demo-os\n", "1.0.0", "is not a valid name"),
    (PRODUCT, "1.0", "is not a semantic version"),
    (PRODUCT, "1.0.0\n", "is not a semantic version"),
    (PRODUCT, "01.0.0", "is not a semantic version"),
])
def test_malformed_product_or_version_is_refused(inputs, product, version, needle):
    """A trailing newline used to pass (``$`` matches before a final newline) and would have
    reached the boot entry's title line."""
    _refused(_create(inputs, product=product, version=version), needle)
    _nothing_left(inputs["out"])


def test_refused_release_leaves_an_existing_release_directory_as_it_was(inputs):
    assert _create(inputs, "--options", "ro quiet").returncode == 0
    before = {p.name: p.read_bytes() for p in inputs["out"].iterdir()}
    assert set(before) == {"release.json", "rootfs.img.zst", "vmlinuz"}
    _refused(_create(inputs, "--version", "2.0.0", "--options", "ro root=/dev/sda1"), "which the device owns")
    assert {p.name: p.read_bytes() for p in inputs["out"].iterdir()} == before
    assert not [p for p in inputs["out"].parent.iterdir() if ".abflip-" in p.name]


def test_a_failure_while_compressing_leaves_no_half_made_release(inputs, monkeypatch):
    """The disk fills in the middle of the work: no output directory, no staging directory."""
    import builder.release

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(builder.release, "compress_image", full)
    with pytest.raises(OSError):
        create_release(inputs["image"], inputs["out"], product=PRODUCT, version="1.0.0", compatible=[HARDWARE],
                       kernel=inputs["kernel"], chunk_size=64 << 10, window=64 << 10)
    _nothing_left(inputs["out"])


def test_chunk_count_over_the_device_limit_is_refused_before_compressing(inputs):
    """A release the device would refuse (too many chunks) is refused up front, with the
    chunk size that would do."""
    with pytest.raises(BuildError, match=r"make 3 chunks, more than the limit 2 \(use a chunk size of at least") as e:
        create_release(inputs["image"], inputs["out"], product=PRODUCT, version="1.0.0", compatible=[HARDWARE],
                       kernel=inputs["kernel"], chunk_size=64 << 10, window=64 << 10, limits=Limits(max_chunks=2))
    assert e.value.exit_code == 2
    _nothing_left(inputs["out"])


def test_a_good_release_reads_back_with_the_device_parser(inputs):
    r = _create(inputs, "--options", 'ro quiet console="ttyS0,115200 n8" rootfstype=erofs', "--json")
    assert r.returncode == 0, r.stderr
    rel = Release.from_bytes((inputs["out"] / "release.json").read_bytes())
    assert rel.boot.options == 'ro quiet console="ttyS0,115200 n8" rootfstype=erofs'
    assert stat.S_IMODE(inputs["out"].stat().st_mode) == 0o755


def test_hand_edited_release_json_is_refused_by_publish_before_any_upload(world, tmp_path):
    """The engineer 'fixes' release.json by hand after 'release create': publish applies the
    device's parser to it first, as the user's error, and uploads nothing."""
    rel = tmp_path / "rel"
    shutil.copytree(world.built["1.0.0"], rel)
    d = json.loads((rel / "release.json").read_text())
    d["boot"]["options"] = "ro\rinitrd /abflip/evil.img"
    (rel / "release.json").write_text(json.dumps(d))
    before = sorted(p.relative_to(world.repo) for p in world.repo.rglob("*"))
    r = _cli("publish", str(rel), "--to", str(world.repo), "--keys", str(world.keys.dir))
    _refused(r, "release.json", "'\\r'", "nothing was published")
    assert sorted(p.relative_to(world.repo) for p in world.repo.rglob("*")) == before


# -- the device side: the same validators, as the repository's fault (items 1-2) -------------
def _manifest(world) -> dict:
    return json.loads((world.built["1.0.0"] / "release.json").read_text())


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["boot"].update(options="ro\refi /EFI/tools/shellx64.efi\roptions init=/bin/sh"), "'\\r'"),
    (lambda d: d["boot"].update(options="ro root=PARTLABEL=root-a"), "'root'"),
    (lambda d: d["boot"].update(options="ro abflip.slot=a"), "'abflip.slot'"),
    (lambda d: d["boot"].update(options="ro rd.abflip.slot=a"), "'rd.abflip.slot'"),
    (lambda d: d["boot"].update(options="ro abflip.verity.hash_offset=0"), "'abflip.verity.hash_offset'"),
    (lambda d: d["boot"].update(options="ro dm_mod.create=root,,,ro,0"), "'dm_mod.create'"),
    (lambda d: d["boot"].update(options="x" * 1025), "more than 1024"),
    (lambda d: d["boot"].update(options='ro "quiet'), "unbalanced"),
    (lambda d: d.update(product="demo-os\n"), "product"),
    (lambda d: d.update(version="1.0.0\n"), "semantic version"),
    (lambda d: d.update(compatible=["acme\r"]), "hardware id"),
    (lambda d: d["image"].update(target="demo-os/releases/1.0.0/../../../x"), "image.target"),
    (lambda d: d["boot"]["kernel"].update(target="demo-os/" + "k" * 600), "boot.kernel.target"),
    (lambda d: d["image"]["compression"].update(level=99), "level=99"),
    (lambda d: d["image"]["compression"].update(chunk_size=4096), "more than the chunk size 4096"),
])
def test_hostile_signer_manifest_is_refused_by_the_device_parser(world, mutate, needle):
    """A signer (compromised CI key) signs a manifest the producer would never write: the
    device's parser refuses it as the repository's fault before anything is written."""
    d = _manifest(world)
    mutate(d)
    with pytest.raises(ManifestError, match="release manifest is invalid") as e:
        Release.from_bytes(json.dumps(d).encode())
    assert needle in e.value.message
    assert e.value.exit_code == 3


def test_hostile_channel_pointer_with_a_traversing_release_path_is_refused():
    good = Channel.from_bytes(json.dumps({"schema": "abflip-channel/1", "product": "p", "channel": "stable",
                                          "version": "1.0.0", "release": "p/releases/1.0.0/release.json"}).encode())
    assert good.release == "p/releases/1.0.0/release.json"
    for release in ("p/releases/../../etc/release.json", "p/releases/1.0.0/release.json\n"):
        with pytest.raises(ManifestError, match="release"):
            Channel.from_bytes(json.dumps({"schema": "abflip-channel/1", "product": "p", "channel": "stable",
                                           "version": "1.0.0", "release": release}).encode())


def test_kernel_tokenizer_and_device_owned_list():
    assert kernel_params('ro  console="ttyS0 115200" "root=x" a=b') == ["ro", 'console="ttyS0 115200"', '"root=x"', "a=b"]
    with pytest.raises(ValueError):
        kernel_params('a="b')
    assert "root" in DEVICE_OWNED_PARAMS and "abflip.*" in DEVICE_OWNED_PARAMS
    assert boot_options_problem("ro quiet splash rootfstype=erofs init=/sbin/init") is None
    assert boot_options_problem("ro rootwait") is None  # a prefix of a name is not the name
    assert "device owns" in boot_options_problem("ro rd.systemd.gpt-auto=0")  # "-" and "_" are one to systemd
    assert "(dm-mod.*)" in boot_options_problem('ro "dm_mod.create=x,,,ro,0 1 verity"')  # the kernel's own dm tables
    assert boot_options_problem("ro dm_verity.prefetch_cluster=0") is None  # a module's tuning is the release's


# -- image build: scratch area, size bound, paths (items 10-12) -------------------------------
def _wrapper(bindir: Path, tool: str, body: str) -> None:
    """A tool of the same name first on PATH that records what it sees, then runs the real one."""
    real = shutil.which(tool) or f"/usr/sbin/{tool}"
    bindir.mkdir(exist_ok=True)
    w = bindir / tool
    w.write_text(f"#!/bin/sh\n{body}\nexec {real} \"$@\"\n")
    w.chmod(0o755)


@ROOT_AND_SETPRIV
def test_setuid_file_from_a_tarball_is_unreachable_by_other_users_during_the_build(tmp_path):
    """Building from a tarball as root in a shared build area: while mkfs runs, the extracted
    tree (a setuid-root shell, with its owner kept) sits in a 0700 directory, so the user
    nobody cannot reach it."""
    tree = make_rootfs(tmp_path / "t", "1.0.0", size=20_000)
    (tree / "bin").mkdir(exist_ok=True)
    shutil.copy("/bin/sh", tree / "bin" / "rootsh")
    (tree / "bin" / "rootsh").chmod(0o4755)
    tarball = tmp_path / "rootfs.tar"
    with tarfile.open(tarball, "w") as tf:
        tf.add(tree, arcname=".")
    log = tmp_path / "mkfs.log"
    _wrapper(tmp_path / "bin", "mkfs.erofs", f"""
tree=""; for a in "$@"; do tree="$a"; done
stat -c 'mode %a' "$(dirname "$tree")" >> {log}
stat -c 'suid %a %u' "$tree/bin/rootsh" >> {log}
if setpriv --reuid=65534 --regid=65534 --clear-groups stat "$tree/bin/rootsh" >/dev/null 2>&1
then echo nobody-reaches-it >> {log}; else echo nobody-cannot >> {log}; fi""")
    shared = Path(tempfile.mkdtemp(prefix="abflip-shared-build-", dir="/tmp"))
    try:
        shared.chmod(0o755)  # a build area other users can list, as a CI workspace often is
        r = _cli("image", "build", str(tarball), "-o", str(shared / "rootfs.img"),
                 env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
        assert r.returncode == 0, r.stderr
        lines = log.read_text().split("\n")
        assert "mode 700" in lines and "suid 4755 0" in lines, lines
        assert "nobody-cannot" in lines, lines
        assert sorted(p.name for p in shared.iterdir()) == ["rootfs.img"]  # scratch removed
    finally:
        shutil.rmtree(shared)


def _sparse_tarball(tmp_path: Path, size: int) -> Path:
    tree = tmp_path / "sparse"
    tree.mkdir()
    (tree / "etc").mkdir()
    (tree / "etc" / "os-release").write_text("ID=demo\n")
    with open(tree / "disk.img", "wb") as f:
        f.truncate(size)
    tarball = tmp_path / "bomb.tar.gz"
    subprocess.run(["tar", "--sparse", "-czf", str(tarball), "-C", str(tree), "."], check=True)
    assert tarball.stat().st_size < 10_000
    return tarball


def test_sparse_tarball_bomb_is_refused_before_mkfs_runs(tmp_path):
    """A 10 KB tarball holding a 256 MiB sparse file, slot 4 MiB: refused from the archive's
    member sizes, before extraction and before mkfs writes anything."""
    tarball = _sparse_tarball(tmp_path, 256 << 20)
    log = tmp_path / "mkfs.log"
    _wrapper(tmp_path / "bin", "mkfs.erofs", f"echo called >> {log}")
    out = tmp_path / "img" / "rootfs.img"
    out.parent.mkdir()
    r = _cli("image", "build", str(tarball), "-o", str(out), "--max-size", str(4 << 20),
             env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    _refused(r, "add up to 268435464 bytes, larger than the slot size 4194304")
    assert not log.exists()
    assert list(out.parent.iterdir()) == []


def test_sparse_tree_over_the_slot_is_refused_before_mke2fs_runs(tmp_path):
    """ext4 from a directory holding a sparse 256 MiB file: mke2fs would make a 256+ MiB image."""
    tree = make_rootfs(tmp_path / "t", "1.0.0", size=10_000)
    with open(tree / "hole", "wb") as f:
        f.truncate(256 << 20)
    log = tmp_path / "mkfs.log"
    _wrapper(tmp_path / "bin", "mke2fs", f"echo called >> {log}")
    out = tmp_path / "img" / "rootfs.img"
    out.parent.mkdir()
    r = _cli("image", "build", str(tree), "-o", str(out), "--fstype", "ext4", "--max-size", str(8 << 20),
             env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    _refused(r, "larger than the slot size 8388608")
    assert not log.exists()
    assert list(out.parent.iterdir()) == []


def test_squashfs_cannot_write_past_the_slot_size_while_it_runs(tmp_path):
    """squashfs compresses, so a tree's size says nothing about the image: mksquashfs runs
    under RLIMIT_FSIZE and is stopped when its output reaches the slot size."""
    tree = make_rootfs(tmp_path / "t", "1.0.0", size=10_000)
    (tree / "noise").write_bytes(os.urandom(3 << 20))
    log = tmp_path / "sizes.log"
    real = shutil.which("mksquashfs")
    (tmp_path / "bin").mkdir()
    w = tmp_path / "bin" / "mksquashfs"  # records the output's size after the real tool ends
    w.write_text(f'#!/bin/sh\n{real} "$@"; rc=$?\nstat -c %s "$2" >> {log} 2>/dev/null\nexit $rc\n')
    w.chmod(0o755)
    out = tmp_path / "img" / "rootfs.img"
    out.parent.mkdir()
    r = _cli("image", "build", str(tree), "-o", str(out), "--fstype", "squashfs", "--max-size", str(1 << 20),
             env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    _refused(r, "larger than the slot size 1048576")
    assert all(int(n) <= 1 << 20 for n in log.read_text().split()), log.read_text()
    assert list(out.parent.iterdir()) == []


def test_paths_beginning_with_a_dash_are_files_not_mkfs_options(tmp_path):
    """A rootfs directory '-x' and an output '-d9.img' (mkfs.erofs reads '-d9' as a debug level
    and '-x' as its xattr option): both reach the real mkfs.erofs as paths."""
    shutil.copytree(make_rootfs(tmp_path / "t", "1.0.0", size=20_000), tmp_path / "-x")
    r = _cli("image", "build", "--output=-d9.img", "--source-date-epoch", "7", "--json", "--", "-x", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == str(tmp_path / "-d9.img")
    assert (tmp_path / "-d9.img").stat().st_size > 0
    r = _cli("image", "build", "--output=-T0.img", "--", "-nope", cwd=tmp_path)
    _refused(r, "does not exist")


@pytest.mark.parametrize("args, needle", [
    (("--max-size", "0"), "--max-size 0 must be a positive"),
    (("--max-size", "-4096"), "must be a positive"),
    (("--source-date-epoch", "-1"), "out of range"),
])
def test_image_build_refuses_impossible_numbers(tmp_path, args, needle):
    tree = make_rootfs(tmp_path / "t", "1.0.0", size=10_000)
    _refused(_cli("image", "build", str(tree), "-o", str(tmp_path / "x.img"), *args), needle)
    assert not (tmp_path / "x.img").exists()


# -- repo gc / verify: junk in the repository (item 14) ---------------------------------------
def _sign_raw_target(world, path: str, data: bytes) -> None:
    """What a confused (or hostile) tool with the targets key leaves in the repository."""
    t = TargetFile.from_data(path, data, ["sha256"])
    world.storage.put(target_key(t), data)
    repo, tag = load_tagged(world.storage)
    repo.add_target(t)
    assert commit(world.storage, world.keys, repo, tag)


def test_gc_skips_and_reports_a_junk_release_path(world):
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        world.publish(v)
    _sign_raw_target(world, "demo-os/releases/not-a-version/junk", b"junk")
    r = _cli("repo", "gc", "--repo", str(world.repo), "--keep", "1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "skipped demo-os/releases/not-a-version/junk: 'not-a-version' is not a semantic version" in r.stdout
    assert "would remove 2.0.0, 1.0.0" in r.stdout
    r = _cli("repo", "gc", "--repo", str(world.repo), "--keep", "1", "--keys", str(world.keys.dir), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["removed_versions"] == {"demo-os": ["2.0.0", "1.0.0"]}
    assert out["skipped"] == [{"path": "demo-os/releases/not-a-version/junk",
                               "reason": "'not-a-version' is not a semantic version; left alone"}]
    repo, _ = load_tagged(world.storage)
    assert "demo-os/releases/not-a-version/junk" in repo.target_files  # what gc cannot parse, it leaves
    assert world.storage.exists(target_key(repo.target_files["demo-os/releases/not-a-version/junk"]))


def test_gc_with_a_malformed_channel_pointer_removes_nothing_of_that_product(world):
    """gc cannot know which release an unreadable pointer pins, so it removes none of that
    product's releases, says so, and still succeeds."""
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        world.publish(v)
    _sign_raw_target(world, "demo-os/channels/beta.json", b"{not a pointer")
    r = _cli("repo", "gc", "--repo", str(world.repo), "--keep", "1", "--keys", str(world.keys.dir))
    assert r.returncode == 0, r.stderr
    assert "skipped demo-os/channels/beta.json: channel pointer unreadable" in r.stdout
    assert "nothing of demo-os is removed" in r.stdout
    repo, _ = load_tagged(world.storage)
    assert all(f"demo-os/releases/{v}/release.json" in repo.target_files for v in ("1.0.0", "2.0.0", "3.0.0"))


def test_verify_reports_a_malformed_channel_pointer_without_crashing(world):
    world.publish("1.0.0")
    _sign_raw_target(world, "demo-os/channels/beta.json", b'{"schema": "abflip-channel/1", "product": "demo-os"}')
    r = _cli("repo", "verify", str(world.repo))
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert "demo-os/stable: 1.0.0  every device  ok" in r.stdout
    assert "demo-os/beta: None  FAIL: channel pointer is invalid" in r.stdout or "FAIL" in r.stdout
