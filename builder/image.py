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
import resource
import shutil
import signal
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError, ToolMissing

__all__ = ["build_image", "ImageInfo", "FSTYPES", "TAR_SUFFIXES", "fstype_of", "check_image_type"]

# fstype -> [(tool, Debian package)]
TOOLS = {
    "erofs": [("mkfs.erofs", "erofs-utils")],
    "squashfs": [("mksquashfs", "squashfs-tools")],
    "ext4": [("mke2fs", "e2fsprogs"), ("debugfs", "e2fsprogs"), ("dumpe2fs", "e2fsprogs")],
}
FSTYPES = tuple(TOOLS)
# fstype -> (offset, magic) of its superblock: erofs EROFS_SUPER_MAGIC_V1 (le32 0xE0F5E1E2 at 1024),
# squashfs "hsqs" (le32 0x73717368 at 0), ext4 s_magic (le16 0xEF53 at 1024 + 0x38)
MAGIC = {"erofs": (1024, b"\xe2\xe1\xf5\xe0"), "squashfs": (0, b"hsqs"), "ext4": (1080, b"\x53\xef")}
MAGIC_BYTES = 2048  # what fstype_of needs of an image
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


def fstype_of(head: bytes) -> str | None:
    """The filesystem whose superblock magic the first :data:`MAGIC_BYTES` of an image hold, if any."""
    return next((t for t, (at, magic) in MAGIC.items() if head[at:at + len(magic)] == magic), None)


def check_image_type(image: Path, fstype: str) -> None:
    """``image`` is a ``fstype`` filesystem image by its superblock magic: a release must not
    claim a type its image is not (the device would write it and then fail to mount it)."""
    try:
        with open(image, "rb") as f:
            head = f.read(MAGIC_BYTES)
    except OSError as e:
        raise BuildError(f"cannot read --image {image}: {e.strerror or e}") from None
    found = fstype_of(head)
    if found == fstype:
        return
    if found is not None:
        article = "an" if found[0] in "aeiou" else "a"
        raise BuildError(f"--image {image} is {article} {found} image, not {fstype}",
                         hint=f"pass --fstype {found} (the type is what the device mounts); nothing was written")
    raise BuildError(f"--image {image} is no {', '.join(FSTYPES[:-1])} or {FSTYPES[-1]} image (no filesystem "
                     "superblock where those have theirs)",
                     hint="build the image with 'abflip image build'; nothing was written")


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
    # The tree holds the archive's setuid files and device nodes with their owners: it lives in
    # a private (0700) directory, so no other user can reach it while the image is built. The
    # tree root itself takes the archive's "./" mode and owner (the image's root directory).
    private = Path(tempfile.mkdtemp(prefix=".abflip-rootfs-", dir=scratch))
    tree = private / "rootfs"
    try:
        os.chmod(private, 0o700)
        tree.mkdir(mode=0o755)
        owners = ["--same-owner", "--numeric-owner"] if os.geteuid() == 0 else ["--no-same-owner"]
        cmd = [tar, "-x", "-p", *owners, "--xattrs", "--xattrs-include=*", "--acls", "-f", str(src), "-C", str(tree)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"cannot extract {src}: {proc.stderr.strip()[-800:]}",
                             hint="check that the archive is complete and of a supported kind")
        # the archive's "./" entry, if any, set the tree root's mode and owner: keep them
        yield tree
    finally:
        shutil.rmtree(private, ignore_errors=True)


def fs_uuid(source_date_epoch: int, label: str = "") -> str:
    return str(uuid.UUID(bytes=hashlib.sha256(f"abflip:{label}:{source_date_epoch}".encode()).digest()[:16]))


def _run(cmd: list[str], env: dict[str, str] | None = None, max_size: int | None = None) -> subprocess.CompletedProcess:
    """Run a tool; with ``max_size``, no file it writes may grow past it (``RLIMIT_FSIZE``: the
    write fails with EFBIG / SIGXFSZ), and it dumps no core."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if max_size is not None and max_size < 1 << 62:  # beyond that no file system limits anything
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_size, max_size))

    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=limit)
    if max_size is not None and proc.returncode != 0 and (
            proc.returncode in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ)
            or any(m in (proc.stderr + proc.stdout).lower() for m in ("file too large", "file size limit exceeded"))):
        raise BuildError(f"the image is larger than the slot size {max_size} ({os.path.basename(cmd[0])} was stopped "
                         "when it reached it)", hint="shrink the root filesystem or raise --max-size to the real slot size")
    return proc


def _fail(tool: str, proc: subprocess.CompletedProcess) -> BuildError:
    return BuildError(f"{os.path.basename(tool)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}")


def _mkfs_erofs(tools: list[str], tree: Path, tmp: Path, epoch: int, fsid: str, xattrs: bool,
                max_size: int | None) -> None:
    cmd = [tools[0], "--quiet", f"-T{epoch}", f"-U{fsid}", "--ignore-mtime", *([] if xattrs else ["-x-1"]), str(tmp), str(tree)]
    # mkfs.erofs 1.5 reads SOURCE_DATE_EPOCH as "clamp newer mtimes", which keeps older ones:
    # drop it and let -T with --ignore-mtime give every inode the same time.
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    proc = _run(cmd, env, max_size)
    if proc.returncode != 0:
        raise _fail(tools[0], proc)


def _mkfs_squashfs(tools: list[str], tree: Path, tmp: Path, epoch: int, fsid: str, xattrs: bool,
                   max_size: int | None) -> None:
    cmd = [tools[0], str(tree), str(tmp), "-noappend", "-reproducible", "-mkfs-time", str(epoch), "-all-time", str(epoch),
           "-comp", "zstd", "-no-progress", "-quiet", *([] if xattrs else ["-no-xattrs"])]
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    proc = _run(cmd, env, max_size)
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


def _mkfs_ext4(tools: list[str], tree: Path, tmp: Path, epoch: int, fsid: str, xattrs: bool,
               max_size: int | None) -> None:
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
            if max_size is not None and size > max_size:  # mke2fs makes an image of exactly this size
                raise _too_big(f"the image would be {size} bytes", max_size)
            tmp.unlink(missing_ok=True)
            cmd = [mke2fs, "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-N", str(n_inodes), "-m", "0",
                   "-U", fsid, "-E", f"hash_seed={fsid},nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                   "-d", str(tree), str(tmp), f"{size // 1024}k"]
            proc = _run(cmd, env, max_size)
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


def _tar_data_bytes(src: Path) -> int | None:
    """Apparent bytes of the regular files an archive holds (sparse members at their full size),
    read from the member headers without extracting; None if Python cannot read it (then tar
    reports the problem)."""
    import tarfile

    import zstandard

    total = 0
    try:
        with open(src, "rb") as raw:
            if src.name.endswith((".tar.zst", ".tzst")):
                stream = zstandard.ZstdDecompressor().stream_reader(raw)
            else:
                stream = raw
            with tarfile.open(fileobj=stream, mode="r|*") as tf:
                for member in tf:
                    if member.isreg():
                        total += member.size
    except (tarfile.TarError, zstandard.ZstdError, OSError, EOFError, ValueError):
        return None
    return total


def _tree_data_bytes(tree: Path) -> int:
    """Apparent bytes of the regular files of a tree (sparse files at their full size), hard links once."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _dirs, files in os.walk(tree):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _too_big(what: str, max_size: int) -> BuildError:
    return BuildError(f"{what}, larger than the slot size {max_size}",
                      hint="shrink the root filesystem or raise --max-size to the real slot size")


# Types that store file data as it is (no compression): the image is at least as large as the
# files' apparent sizes, so a tree over --max-size is refused before mkfs runs.
_STORES_DATA_AS_IS = ("erofs", "ext4")


def build_image(src: Path, out: Path, *, fstype: str = "erofs", source_date_epoch: int | None = None,
                fs_id: str | None = None, max_size: int | None = None, xattrs: bool = True,
                force: bool = False) -> ImageInfo:
    """Build ``out`` from the tree or tarball ``src``; refuse an image larger than ``max_size``.

    The size bound holds before and during the work, not only after it: for erofs and ext4
    (which store file data as it is) the archive's member sizes and then the tree's apparent
    size are checked before mkfs runs, and every mkfs run is confined by ``RLIMIT_FSIZE`` so
    it cannot write an image larger than ``max_size`` whatever it is given (a squashfs tree
    compresses, so only that limit applies to it). Every path reaches an external tool
    absolute, so a name beginning with '-' is never read as an option. An existing ``out`` is
    replaced only with ``force``."""
    tools = _tools(fstype)
    # absolute, not resolved: "-o" stays a file name, a symlinked directory stays where it is
    src = Path(src).absolute()
    out = Path(out).absolute()
    if max_size is not None and (isinstance(max_size, bool) or max_size < 1):
        raise BuildError(f"--max-size {max_size} must be a positive number of bytes", hint="pass the slot size")
    if not src.exists() and not src.is_symlink():
        raise BuildError(f"root filesystem {src} does not exist", hint="pass a directory or a tarball")
    if out.is_dir():
        raise BuildError(f"output {out} is a directory", hint="pass the image file to write with -o")
    if not out.parent.is_dir():
        raise BuildError(f"the directory of the output {out} does not exist", hint="create it first")
    if not force and (out.exists() or out.is_symlink()):
        raise BuildError(f"output {out} exists", hint="pass --force to replace it, or another -o; nothing was written")
    try:
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0")) if source_date_epoch is None else source_date_epoch
    except ValueError:
        raise BuildError(f"SOURCE_DATE_EPOCH={os.environ['SOURCE_DATE_EPOCH']!r} is not an integer") from None
    if not 0 <= epoch <= 0xFFFFFFFF:  # squashfs and ext4 store 32-bit times
        raise BuildError(f"source date epoch {epoch} is out of range [0, {0xFFFFFFFF}]")
    fsid = fs_id or fs_uuid(epoch)
    if max_size is not None and fstype in _STORES_DATA_AS_IS and is_tarball(src):
        data = _tar_data_bytes(src)
        if data is not None and data > max_size:
            raise _too_big(f"the files in {src.name} add up to {data} bytes", max_size)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        with _source_tree(src, out.parent) as tree:
            _check_tree(tree)
            if max_size is not None and fstype in _STORES_DATA_AS_IS:
                data = _tree_data_bytes(tree)
                if data > max_size:
                    raise _too_big(f"the root filesystem's files add up to {data} bytes", max_size)
            _MKFS[fstype](tools, tree, tmp, epoch, fsid, xattrs, max_size)
        size = tmp.stat().st_size
        if max_size is not None and size > max_size:
            raise _too_big(f"the image is {size} bytes", max_size)
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            while b := f.read(1 << 20):
                h.update(b)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ImageInfo(out, fstype, size, h.hexdigest())
