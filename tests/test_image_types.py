"""Image builds for every filesystem type and input kind, and UKI releases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from abflip.demo import HARDWARE, PRODUCT, make_rootfs
from builder.errors import BuildError, ToolMissing
from builder.image import FSTYPES, build_image
from builder.release import create_release
from metadata.manifest import Release

ABFLIP = [sys.executable, "-m", "abflip.cli"]


def _tree(base: Path) -> Path:
    tree = make_rootfs(base, "1.0.0", size=300_000)
    (tree / "usr" / "bin").mkdir(parents=True, exist_ok=True)
    suid = tree / "usr" / "bin" / "tool"
    suid.write_bytes(b"#!/bin/sh\n")
    if os.geteuid() == 0:
        os.chown(suid, 1234, 5678)
    os.chmod(suid, 0o4755)
    os.symlink("does-not-exist", tree / "etc" / "dangling")  # a dangling symlink is a valid symlink
    os.mkfifo(tree / "etc" / "initctl")  # special files are copied, not read
    (tree / "empty-dir").mkdir()
    return tree


def _copy_reordered(src: Path, dst: Path) -> None:
    """Copy ``src`` creating entries in reverse order, with other mtimes."""
    dst.mkdir()
    shutil.copystat(src, dst)
    for dirpath, dirs, files in sorted(os.walk(src)):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(exist_ok=True)
        for name in sorted(files + dirs, reverse=True):
            s, d = Path(dirpath) / name, dst / rel / name
            if s.is_symlink():
                os.symlink(os.readlink(s), d)
            elif s.is_dir():
                d.mkdir(exist_ok=True)
            elif s.is_fifo():
                os.mkfifo(d)
            else:
                shutil.copy2(s, d)
            if os.geteuid() == 0:
                st = s.lstat()
                os.lchown(d, st.st_uid, st.st_gid)
            if not s.is_symlink():
                os.chmod(d, s.lstat().st_mode & 0o7777)
    for p in [*dst.rglob("*"), dst]:
        os.utime(p, (1, 1), follow_symlinks=False)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("trees")
    a = _tree(base / "a")
    b = base / "b"
    _copy_reordered(a, b)
    tars = {}
    for suffix, flag in ((".tar", []), (".tar.gz", ["-z"]), (".tar.zst", ["--zstd"])):
        out = base / f"rootfs{suffix}"
        subprocess.run(["tar", "-C", str(a), "--numeric-owner", "--xattrs", *flag, "-cf", str(out), "."], check=True)
        tars[suffix] = out
    return {"a": a, "b": b, "tars": tars, "base": base}


@pytest.mark.parametrize("fstype", FSTYPES)
def test_every_type_is_reproducible(trees, tmp_path, fstype):
    i1 = build_image(trees["a"], tmp_path / "1.img", fstype=fstype, source_date_epoch=1234)
    i2 = build_image(trees["b"], tmp_path / "2.img", fstype=fstype, source_date_epoch=1234)
    assert i1.fstype == fstype and i2.sha256 == i1.sha256
    assert (tmp_path / "1.img").read_bytes() == (tmp_path / "2.img").read_bytes()
    i3 = build_image(trees["a"], tmp_path / "3.img", fstype=fstype, source_date_epoch=99)
    assert i3.sha256 != i1.sha256  # the epoch is in the image


@pytest.mark.parametrize("fstype", FSTYPES)
@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tar.zst"])
def test_tarball_input_equals_directory_input(trees, tmp_path, fstype, suffix):
    from_dir = build_image(trees["a"], tmp_path / "d.img", fstype=fstype, source_date_epoch=7)
    from_tar = build_image(trees["tars"][suffix], tmp_path / "t.img", fstype=fstype, source_date_epoch=7)
    assert from_tar.sha256 == from_dir.sha256  # owners, modes, links and special files all survived
    assert not list(tmp_path.glob(".abflip-rootfs-*"))  # the extraction is cleaned up


@pytest.mark.skipif(os.geteuid() != 0, reason="keeping foreign owners needs root")
def test_tar_owners_and_modes_are_kept_in_ext4(trees, tmp_path):
    build_image(trees["tars"][".tar.zst"], tmp_path / "t.img", fstype="ext4", source_date_epoch=7)
    out = subprocess.run(["debugfs", "-R", "stat /usr/bin/tool", str(tmp_path / "t.img")], capture_output=True,
                         text=True).stdout
    assert "User:  1234" in out and "Group:  5678" in out
    assert "Mode:  04755" in out
    assert "mtime: 0x00000007" in out


@pytest.mark.parametrize("fstype", FSTYPES)
def test_image_over_slot_size_is_refused(trees, tmp_path, fstype):
    with pytest.raises(BuildError, match="larger than the slot size"):
        build_image(trees["a"], tmp_path / "x.img", fstype=fstype, max_size=4096)
    assert not (tmp_path / "x.img").exists() and not (tmp_path / "x.img.tmp").exists()


@pytest.mark.parametrize("fstype,tool,package", [("erofs", "mkfs.erofs", "erofs-utils"),
                                                 ("squashfs", "mksquashfs", "squashfs-tools"),
                                                 ("ext4", "mke2fs", "e2fsprogs")])
def test_missing_tool_names_the_package(trees, tmp_path, monkeypatch, fstype, tool, package):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("builder.image.os.access", lambda p, m: False)
    with pytest.raises(ToolMissing, match=f"{tool} is not installed") as err:
        build_image(trees["a"], tmp_path / "x.img", fstype=fstype)
    assert f"apt-get install {package}" in err.value.hint


def test_bad_rootfs_inputs(tmp_path):
    with pytest.raises(BuildError, match="does not exist"):
        build_image(tmp_path / "missing", tmp_path / "x.img")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BuildError, match="neither a directory nor a tarball"):
        build_image(tmp_path / "notes.txt", tmp_path / "x.img")
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(BuildError, match="cannot extract"):
        build_image(tmp_path / "broken.tar.gz", tmp_path / "x.img")
    with pytest.raises(BuildError, match="unknown filesystem type"):
        build_image(tmp_path, tmp_path / "x.img", fstype="btrfs")
    assert not (tmp_path / "x.img").exists()


def test_cli_builds_squashfs_from_a_tarball(trees, tmp_path):
    r = subprocess.run([*ABFLIP, "image", "build", str(trees["tars"][".tar.zst"]), "-o", str(tmp_path / "i.sqfs"),
                        "--fstype", "squashfs", "--source-date-epoch", "5", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["fstype"] == "squashfs"
    r = subprocess.run([*ABFLIP, "image", "build", str(tmp_path / "nope"), "-o", str(tmp_path / "x"), "--fstype", "ext4"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_uki_release_installs_with_an_efi_entry(world, tmp_path):
    """A release carrying a unified kernel image: manifest boot.uki, the device writes
    /abflip/<v>/uki.efi and a Type #1 entry with an `efi` line."""
    uki = tmp_path / "linux.efi"
    uki.write_bytes(b"MZ unified kernel image " * 100)
    with pytest.raises(BuildError, match="either a kernel"):
        create_release(world.built["2.0.0.img"], tmp_path / "bad", product=PRODUCT, version="2.5.0",
                       compatible=[HARDWARE], kernel=uki, uki=uki)
    rel = create_release(world.built["2.0.0.img"], tmp_path / "rel", product=PRODUCT, version="2.5.0",
                         compatible=[HARDWARE], uki=uki, options="ro quiet", chunk_size=256 << 10, window=256 << 10)
    manifest = json.loads((tmp_path / "rel" / "release.json").read_text())
    assert manifest["boot"]["uki"]["target"] == "demo-os/releases/2.5.0/uki.efi"
    assert manifest["boot"]["kernel"] is None
    assert Release.from_bytes((tmp_path / "rel" / "release.json").read_bytes()) == rel.release
    # kernel releases keep the old schema exactly (no "uki" key)
    assert "uki" not in json.loads((world.built["1.0.0"] / "release.json").read_text())["boot"]
    world.publish("1.0.0")
    from builder.publish import publish_release

    publish_release(tmp_path / "rel", world.storage, world.keys, channel="stable")
    sim, dev = world.device()
    result = dev.install()
    assert result.version == "2.5.0"
    assert (sim.esp / "abflip" / "2.5.0-b" / "uki.efi").read_bytes() == uki.read_bytes()
    entry = next((sim.esp / "loader" / "entries").glob("abflip-2.5.0-*"))
    text = entry.read_text()
    assert "efi /abflip/2.5.0-b/uki.efi" in text and "linux" not in text
    assert "options root=PARTLABEL=root-b abflip.slot=b ro quiet" in text


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_unreadable_file_is_a_clear_error_even_for_root(tmp_path):
    """Root reads everything, so the build runs as root *without* CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH (setpriv), as a builder confined by a container profile would."""
    tree = make_rootfs(tmp_path / "t", "1.0.0", size=50_000)
    (tree / "etc" / "secret").write_text("x")
    (tree / "etc" / "secret").chmod(0)
    code = ("import sys; from builder.image import build_image\n"
            "from metadata.errors import Error\n"
            "try:\n    build_image(sys.argv[1], sys.argv[2])\n"
            "except Error as e:\n    print(e.message); sys.exit(e.exit_code)\n")
    drop = "-dac_override,-dac_read_search"
    r = subprocess.run(["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", sys.executable, "-c", code,
                        str(tree), str(tmp_path / "x.img")], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2, r.stderr
    assert f"cannot read {tree / 'etc' / 'secret'}" in r.stdout
    assert not (tmp_path / "x.img").exists()
