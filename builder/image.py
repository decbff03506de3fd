"""Build a root filesystem image from a directory or a tarball, reproducibly.

Inputs: a directory, or a ``.tar``/``.tar.gz``/``.tgz``/``.tar.xz``/``.tar.zst`` archive. None of
the mkfs tools here reads tar (erofs-utils 1.5, squashfs-tools 4.5, e2fsprogs 1.47.0), so an
archive is extracted first with GNU tar into a private temporary directory, keeping the
archive's numeric owners, modes, xattrs and device nodes (``--numeric-owner --same-owner``;
owners are kept only when building as root, as a real rootfs build is).

Outputs, each bit-identical for the same tree and ``SOURCE_DATE_EPOCH`` whatever the files'
mtimes/ctimes and the order the directory lists them in:

- ``erofs`` (default): ``mkfs.erofs -T E --ignore-mtime -U <uuid>`` (the tool sorts entries);
- ``squashfs``: ``mksquashfs -reproducible -mkfs-time E -all-time E -noappend -comp zstd``;
  xattrs are kept (``xattrs=False`` adds ``-no-xattrs``);
- ``ext4``: ``mke2fs -t ext4 -d`` with a fixed UUID and ``hash_seed``, a fixed mke2fs.conf
  (the host's /etc/mke2fs.conf must not change the bytes), ``E2FSPROGS_FAKE_TIME=E`` for the
  superblock and new inodes, then every inode's times set to ``E`` with ``debugfs`` (mke2fs
  copies the source's mtime *and ctime*, and a ctime cannot be set on the source). The size
  is computed from the tree and grown if mke2fs runs out of room.

The filesystem UUID is derived from the epoch (or given), so it is fixed too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError, ToolMissing

__all__ = ["build_image", "ImageInfo", "FSTYPES", "TAR_SUFFIXES"]

# fstype -> [(tool, Debian package)]
TOOLS = {
    "erofs": [("mkfs.erofs", "erofs-utils")],
    "squashfs": [("mksquashfs", "squashfs-tools")],
    "ext4": [("mke2fs", "e2fsprogs"), ("debugfs", "e2fsprogs"), ("dumpe2fs", "e2fsprogs")],
}
FSTYPES = tuple(TOOLS)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.zst", ".tzst", ".tar.bz2")

# A fixed mke2fs configuration (Debian 12's ext4 defaults), so the host's does not matter.
MKE2FS_CONF = """\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
"""


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    fstype: str
    size: int
    sha256: str


def _find(tool: str) -> str | None:
    return shutil.which(tool) or next((p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{tool}", os.X_OK)), None)


def _tools(fstype: str) -> list[str]:
    try:
        needed = TOOLS[fstype]
    except KeyError:
        raise BuildError(f"unknown filesystem type {fstype!r}", hint=f"use one of {', '.join(TOOLS)}") from None
    out = []
    for tool, package in needed:
        path = _find(tool)
        if not path:
            raise ToolMissing(tool, package)
        out.append(path)
    return out


def _tool(fstype: str) -> str:  # kept for callers of the old name
    return _tools(fstype)[0]


def is_tarball(path: Path) -> bool:
    return path.is_file() and path.name.endswith(TAR_SUFFIXES)


def _check_tree(src: Path) -> None:
    if not src.is_dir():
        raise BuildError(f"root filesystem directory {src} does not exist or is not a directory",
                         hint=f"pass a directory or a tarball ({', '.join(TAR_SUFFIXES)})")
    for dirpath, dirs, files in os.walk(src):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p) and os.path.isfile(p) and not os.access(p, os.R_OK):
                raise BuildError(f"cannot read {p}", hint="fix its permissions or build as a user who can read it")
        for name in dirs:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p) and not os.access(p, os.R_OK | os.X_OK):
                raise BuildError(f"cannot read directory {p}")


@contextmanager
def _source_tree(src: Path, scratch: Path) -> Iterator[Path]:
    """The directory to build from: ``src`` itself, or a tarball extracted under ``scratch``."""
    if src.is_dir():
        yield src
        return
    if not src.exists():
        raise BuildError(f"root filesystem {src} does not exist", hint="pass a directory or a tarball")
    if not is_tarball(src):
        raise BuildError(f"{src} is neither a directory nor a tarball ({', '.join(TAR_SUFFIXES)})")
    tar = _find("tar")
    if not tar:
        raise ToolMissing("tar", "tar")
    if src.name.endswith((".tar.zst", ".tzst")) and not _find("zstd"):
        raise ToolMissing("zstd", "zstd")
    tree = Path(tempfile.mkdtemp(prefix=".abflip-rootfs-", dir=scratch))
    try:
        os.chmod(tree, 0o755)
        owners = ["--same-owner", "--numeric-owner"] if os.geteuid() == 0 else ["--no-same-owner"]
        cmd = [tar, "-x", "-p", *owners, "--xattrs", "--xattrs-include=*", "--acls", "-f", str(src), "-C", str(tree)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"cannot extract {src}: {proc.stderr.strip()[-800:]}",
                             hint="check that the archive is complete and of a supported kind")
        # the archive's "./" entry, if any, set the tree root's mode and owner: keep them
        yield tree
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def fs_uuid(source_date_epoch: int, label: str = "") -> str:
    return str(uuid.UUID(bytes=hashlib.sha256(f"abflip:{label}:{source_date_epoch}".encode()).digest()[:16]))


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def _fail(tool: str, proc: subprocess.CompletedProcess) -> BuildError:
    return BuildError(f"{os.path.basename(tool)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}")


def _mkfs_erofs(tools: list[str], tree: Path, tmp: Path, epoch: int, fsid: str, xattrs: bool) -> None:
    cmd = [tools[0], "--quiet", f"-T{epoch}", f"-U{fsid}", "--ignore-mtime", *([] if xattrs else ["-x-1"]), str(tmp), str(tree)]
    # mkfs.erofs 1.5 reads SOURCE_DATE_EPOCH as "clamp newer mtimes", which keeps older ones:
    # drop it and let -T with --ignore-mtime give every inode the same time.
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    proc = _run(cmd, env)
    if proc.returncode != 0:
        raise _fail(tools[0], proc)


def _mkfs_squashfs(tools: list[str], tree: Path, tmp: Path, epoch: int, fsid: str, xattrs: bool) -> None:
    cmd = [tools[0], str(tree), str(tmp), "-noappend", "-reproducible", "-mkfs-time", str(epoch), "-all-time", str(epoch),
           "-comp", "zstd", "-no-progress", "-quiet", *([] if xattrs else ["-no-xattrs"])]
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    proc = _run(cmd, env)
    if proc.returncode != 0:
        raise _fail(tools[0], proc)


def _tree_usage(tree: Path) -> tuple[int, int]:
    """(bytes of 4 KiB blocks the files need, inode count) of a tree, counting hard links once."""
    blocks = 0
    inodes = 1
    seen: set[tuple[int, int]] = set()
    for dirpath, dirs, files in os.walk(tree):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            blocks += (st.st_size + 4095) // 4096 + 1  # data + a block of slack (extents, xattrs, dirs)
    return blocks * 4096, inodes


def _mkfs_ext4(tools: list[str], tree: Path, tmp: Path, epoch: int, fsid: str, xattrs: bool) -> None:
    mke2fs, debugfs, dumpe2fs = tools
    data, inodes = _tree_usage(tree)
    n_inodes = max(128, inodes + inodes // 8 + 64)
    size = data + data // 8 + n_inodes * 256 + (24 << 20)  # + inode tables, bitmaps, journal, reserve
    with tempfile.NamedTemporaryFile("w", suffix=".conf", prefix="abflip-mke2fs-") as conf:
        conf.write(MKE2FS_CONF)
        conf.flush()
        env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
        env.update(MKE2FS_CONFIG=conf.name, E2FSPROGS_FAKE_TIME=str(epoch), MKE2FS_SYNC="0",
                   MKE2FS_DEVICE_SECTSIZE="512", MKE2FS_DEVICE_PHYS_SECTSIZE="4096")
        for _ in range(6):
            size = (size + (1 << 20) - 1) & ~((1 << 20) - 1)
            tmp.unlink(missing_ok=True)
            cmd = [mke2fs, "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-N", str(n_inodes), "-m", "0",
                   "-U", fsid, "-E", f"hash_seed={fsid},nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                   "-d", str(tree), str(tmp), f"{size // 1024}k"]
            proc = _run(cmd, env)
            if proc.returncode == 0:
                break
            err = (proc.stderr + proc.stdout).lower()
            if "could not allocate" in err or "no space" in err or "not enough" in err or "no free space" in err:
                size = size * 3 // 2
                continue
            raise _fail(mke2fs, proc)
        else:
            raise BuildError(f"mke2fs ran out of room even at {size} bytes")
        # mke2fs -d copied each source inode's mtime/atime/ctime: set them all to the epoch.
        proc = _run([dumpe2fs, "-h", str(tmp)], env)
        if proc.returncode != 0:
            raise _fail(dumpe2fs, proc)
        fields = dict(line.split(":", 1) for line in proc.stdout.splitlines() if ":" in line)
        used = int(fields["Inode count"]) - int(fields["Free inodes"])
        lines = []
        for ino in (2, *range(11, used + 1)):
            for f in ("atime", "mtime", "ctime", "crtime"):
                lines.append(f"sif <{ino}> {f} {epoch}")
                lines.append(f"sif <{ino}> {f}_extra 0")
        with tempfile.NamedTemporaryFile("w", suffix=".debugfs", prefix="abflip-") as script:
            script.write("\n".join(lines) + "\n")
            script.flush()
            proc = _run([debugfs, "-w", "-f", script.name, str(tmp)], env)
            if proc.returncode != 0:
                raise _fail(debugfs, proc)


_MKFS = {"erofs": _mkfs_erofs, "squashfs": _mkfs_squashfs, "ext4": _mkfs_ext4}


def build_image(src: Path, out: Path, *, fstype: str = "erofs", source_date_epoch: int | None = None,
                fs_id: str | None = None, max_size: int | None = None, xattrs: bool = True) -> ImageInfo:
    """Build ``out`` from the tree or tarball ``src``; refuse an image larger than ``max_size``."""
    tools = _tools(fstype)
    src = Path(src)
    out = Path(out)
    if not src.exists() and not src.is_symlink():
        raise BuildError(f"root filesystem {src} does not exist", hint="pass a directory or a tarball")
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0")) if source_date_epoch is None else source_date_epoch
    fsid = fs_id or fs_uuid(epoch)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        with _source_tree(src, out.parent) as tree:
            _check_tree(tree)
            _MKFS[fstype](tools, tree, tmp, epoch, fsid, xattrs)
        size = tmp.stat().st_size
        if max_size is not None and size > max_size:
            raise BuildError(f"the image is {size} bytes, larger than the slot size {max_size}",
                             hint="shrink the root filesystem or raise --max-size to the real slot size")
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            while b := f.read(1 << 20):
                h.update(b)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ImageInfo(out, fstype, size, h.hexdigest())
