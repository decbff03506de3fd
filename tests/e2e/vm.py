"""Real-firmware test tooling: OVMF + systemd-boot + a Debian kernel under QEMU (TCG), no KVM, no root mounts.

The pieces, in the order a test uses them:

* `fetch_kernel` downloads (once, cached) a Debian kernel package with `apt-get download` and unpacks it with
  `dpkg -x`; nothing is installed on the host.
* `build_initramfs` makes a busybox-static initramfs that stands in for a whole OS version: it reports, on the
  serial console, which version and slot it is and which boot entry the firmware started (from systemd-boot's EFI
  variables), reads the version file in its root filesystem (an erofs image in its slot partition), then powers
  off (a good image) or panics (a bad image, which with `panic=1` resets the VM and burns one boot try).
* `build_rootfs_image` makes that root filesystem; `build_disk` a GPT disk image (ESP + `root-a` + `root-b`) with
  systemd-boot installed as the removable-media loader; `write_partition` and `esp` fill it.
* `boot` runs QEMU on the disk until the guest powers off (or a timeout), and returns every boot the guest reported,
  in order (a VM that panics and resets reports several).

Lines the guest prints (one per event, space-separated `key=value`, values never contain spaces, `-` = empty):

    ABFLIP-BOOT version=2.0.0 slot=b selected=<LoaderEntrySelected> countpath=<LoaderBootCountPath> entry=<..>
                uptime=1.23                                   (all on one line)
    ABFLIP-ROOT label=root-b dev=/dev/vda3 version=2.0.0          (or error=<reason>)
    ABFLIP-END action=poweroff|panic

`entry` is `countpath` when systemd-boot set it (the entry had a boot counter), else `selected`. EFI variable values
are the UTF-16LE string after the 4-byte attribute header, with backslashes as the firmware wrote them.

Nothing here mounts anything on the host: the ESP is written with mtools (`applier.bootloader.esp_fat.FatImageEsp`), the root
images with plain file writes at partition offsets. Host tools: qemu-system-x86, ovmf, systemd-boot-efi,
busybox-static, mtools, fdisk, dosfstools, erofs-utils (see `APT_PACKAGES`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import logging
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from applier.bootloader.esp_fat import FatImageEsp

log = logging.getLogger(__name__)

__all__ = [
    "APT_PACKAGES",
    "BootRecord",
    "BootResult",
    "DEFAULT_MODULES",
    "DiskLayout",
    "LOADER_GUID",
    "Partition",
    "attach_loop",
    "boot",
    "build_disk",
    "build_initramfs",
    "build_os_version",
    "build_rootfs_image",
    "default_cache_dir",
    "detach_loop",
    "entry_text",
    "esp",
    "fetch_kernel",
    "fresh_vars",
    "install_os_version",
    "list_entries",
    "loop_partition",
    "missing_prerequisites",
    "OsVersion",
    "parse_serial",
    "read_esp_file",
    "resolve_modules",
    "write_esp_file",
    "write_partition",
]

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
SYSTEMD_BOOT_EFI = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"

#: Vendor GUID of systemd-boot's Loader* EFI variables.
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"

#: Debian packages providing every host tool used here.
APT_PACKAGES = (
    "qemu-system-x86",
    "ovmf",
    "systemd-boot-efi",
    "busybox-static",
    "mtools",
    "fdisk",
    "dosfstools",
    "erofs-utils",
)

#: Modules the guest loads (their `depends=` are added in front automatically). crc32c_generic comes first because
#: libcrc32c (erofs' dependency) needs a crc32c implementation but names it only as a soft dependency.
DEFAULT_MODULES = ("crc32c_generic", "virtio_pci", "virtio_blk", "erofs", "efivarfs")

_TOOLS = {
    QEMU: "qemu-system-x86",
    "mcopy": "mtools",
    "sfdisk": "fdisk",
    "mkfs.fat": "dosfstools",
    "mkfs.erofs": "erofs-utils",
    "timeout": "coreutils",
}

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
MiB = 1 << 20
SECTOR = 512


def default_cache_dir() -> Path:
    """`$ABFLIP_E2E_CACHE`, else `~/.cache/abflip-e2e`."""
    env = os.environ.get("ABFLIP_E2E_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "abflip-e2e"


def missing_prerequisites() -> list[str]:
    """Human-readable list of host tools/files this module needs but cannot find (empty if all present)."""
    missing = [f"{tool} (apt: {pkg})" for tool, pkg in _TOOLS.items() if shutil.which(tool) is None]
    for path, pkg in (
        (OVMF_CODE, "ovmf"),
        (OVMF_VARS, "ovmf"),
        (SYSTEMD_BOOT_EFI, "systemd-boot-efi"),
        (BUSYBOX, "busybox-static"),
    ):
        if not path.is_file():
            missing.append(f"{path} (apt: {pkg})")
    return missing


def _run(cmd: Sequence[str | os.PathLike[str]], **kwargs) -> subprocess.CompletedProcess:
    """Run a host command, raising RuntimeError with its output on failure."""
    argv = [os.fspath(c) for c in cmd]
    log.debug("run: %s", " ".join(argv))
    kwargs.setdefault("capture_output", True)
    if "input" not in kwargs:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.run(argv, check=False, **kwargs)
    if proc.returncode != 0:
        out = proc.stderr if proc.stderr is not None else b""
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        raise RuntimeError(f"command failed (exit {proc.returncode}): {' '.join(argv)}\n{out.strip()}")
    return proc


# ------------------------------------------------------------------------------------------------------ kernel


def _newest_kernel_package() -> str:
    out = _run(
        ["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$"], text=True
    ).stdout
    names = re.findall(r"^(linux-image-6\.1\.0-(\d+)-amd64-unsigned)\s", out, re.M)
    if not names:
        raise RuntimeError(
            "no linux-image-6.1.0-NN-amd64-unsigned package known to apt; run `apt-get update` (Debian bookworm)"
        )
    return max(names, key=lambda n: int(n[1]))[0]


def fetch_kernel(cache_dir: str | os.PathLike[str] | None = None, package: str | None = None) -> tuple[Path, Path]:
    """Return `(vmlinuz, modules_dir)` of a Debian 6.1 amd64 kernel unpacked under `cache_dir/kernel/<package>`.

    Idempotent: an already unpacked kernel is reused without asking apt (the newest cached one when `package` is
    None). Otherwise the newest `linux-image-6.1.0-NN-amd64-unsigned` apt knows is downloaded with
    `apt-get download` and unpacked with `dpkg -x` (not installed), then the .deb is deleted.
    `modules_dir` is `.../lib/modules/<kernel release>`.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    kroot = root / "kernel"
    kroot.mkdir(parents=True, exist_ok=True)

    def complete(pkg_dir: Path) -> tuple[Path, Path] | None:
        if not (pkg_dir / ".complete").is_file():
            return None
        vmlinuz = sorted((pkg_dir / "boot").glob("vmlinuz-*"))
        mods = sorted(p for p in (pkg_dir / "lib" / "modules").glob("*") if p.is_dir())
        if len(vmlinuz) != 1 or len(mods) != 1:
            return None
        return vmlinuz[0], mods[0]

    if package is None:
        cached = sorted(
            (p for p in kroot.glob("linux-image-*") if complete(p)),
            key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)],
        )
        if cached:
            log.info("using cached kernel %s", cached[-1].name)
            return complete(cached[-1])  # type: ignore[return-value]
        package = _newest_kernel_package()

    pkg_dir = kroot / package
    found = complete(pkg_dir)
    if found:
        return found

    log.info("downloading kernel package %s into %s", package, kroot)
    with tempfile.TemporaryDirectory(dir=kroot, prefix=".download-") as tmp:
        _run(["apt-get", "download", "-q", package], cwd=tmp)
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"apt-get download {package} produced {debs}")
        unpack = Path(tmp) / "root"
        _run(["dpkg", "-x", debs[0], unpack])
        (unpack / ".complete").write_text(package + "\n")
        if pkg_dir.exists():
            shutil.rmtree(pkg_dir)
        unpack.rename(pkg_dir)
    found = complete(pkg_dir)
    if not found:
        raise RuntimeError(f"{package} does not contain exactly one /boot/vmlinuz-* and one /lib/modules/* dir")
    return found


# -------------------------------------------------------------------------------------------------- initramfs


def _module_index(modules_dir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in (modules_dir / "kernel").rglob("*.ko*"):
        name = path.name.split(".ko", 1)[0].replace("-", "_")
        index.setdefault(name, path)
    return index


def _module_bytes(path: Path) -> bytes:
    """Module content, decompressed (busybox insmod takes plain ELF)."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        import zstandard  # a project dependency; only needed for zstd-compressed modules

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def _module_depends(data: bytes) -> list[str]:
    match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    if not match or not match.group(1):
        return []
    return [d.decode().replace("-", "_") for d in match.group(1).split(b",") if d]


def resolve_modules(
    modules_dir: str | os.PathLike[str], names: Iterable[str] = DEFAULT_MODULES
) -> list[tuple[str, bytes]]:
    """`(name, plain .ko bytes)` for `names` and their `depends=` (read from each module's .modinfo), each after
    its dependencies, in the order the guest must insmod them (there is no modules.dep in an unpacked .deb)."""
    index = _module_index(Path(modules_dir))
    ordered: list[tuple[str, bytes]] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in done:
            return
        if name in visiting:
            raise RuntimeError(f"module dependency cycle at {name}")
        if name not in index:
            raise RuntimeError(f"kernel module {name} not found under {modules_dir} (built in? check config)")
        visiting.add(name)
        data = _module_bytes(index[name])
        for dep in _module_depends(data):
            visit(dep)
        visiting.discard(name)
        done.add(name)
        ordered.append((name, data))

    for name in names:
        visit(name)
    return ordered


class _Newc:
    """Minimal writer of a cpio "newc" archive (what the kernel unpacks as initramfs); no root needed for nodes."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 1

    def _add(self, name: str, mode: int, data: bytes = b"", nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        self._out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        self._out += b"\0" * (-len(self._out) % 4)
        self._out += data
        self._out += b"\0" * (-len(self._out) % 4)

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._add(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._add(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._add(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._add(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._add("TRAILER!!!", 0)
        self._out += b"\0" * (-len(self._out) % 512)
        return bytes(self._out)


_INIT_TEMPLATE = r"""#!/bin/busybox sh
# abflip e2e stand-in OS: version @VERSION@, @KIND@ image.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || echo "ABFLIP-WARN insmod $m failed"
done
mount -t efivarfs efivarfs /sys/firmware/efi/efivars || echo "ABFLIP-WARN efivarfs mount failed"

efivar() {
    f="/sys/firmware/efi/efivars/$1-@GUID@"
    v=""
    [ -r "$f" ] && v=$(dd if="$f" bs=1 skip=4 2>/dev/null | tr -d '\000' | tr ' ' '_')
    printf '%s' "${v:--}"
}
cmdarg() {
    for a in $(cat /proc/cmdline); do
        case "$a" in "$1"=*) printf '%s' "${a#*=}"; return;; esac
    done
}
uptime() { cut -d' ' -f1 /proc/uptime; }

slot=$(cmdarg abflip.slot)
selected=$(efivar LoaderEntrySelected)
countpath=$(efivar LoaderBootCountPath)
entry=$countpath
[ "$entry" = "-" ] && entry=$selected
printf 'ABFLIP-BOOT version=%s slot=%s selected=%s countpath=%s entry=%s uptime=%s\n' \
    "@VERSION@" "${slot:--}" "$selected" "$countpath" "$entry" "$(uptime)"

root=$(cmdarg root)
if [ "@MOUNT_ROOT@" = "1" ] && [ -n "$root" ]; then
    label=${root#PARTLABEL=}
    dev=""
    i=0
    while [ -z "$dev" ] && [ $i -lt 50 ]; do
        for u in /sys/class/block/*/uevent; do
            if grep -qx "PARTNAME=$label" "$u"; then
                dev=/dev/$(sed -n 's/^DEVNAME=//p' "$u")
            fi
        done
        [ -z "$dev" ] && { sleep 0.1; i=$((i + 1)); }
    done
    mkdir -p /newroot
    if [ -z "$dev" ]; then
        echo "ABFLIP-ROOT label=$label error=no-partition"
    elif ! mount -t @ROOT_FSTYPE@ -o ro "$dev" /newroot; then
        echo "ABFLIP-ROOT label=$label dev=$dev error=mount-failed"
    else
        rv=$(head -n1 /newroot@VERSION_FILE@ 2>/dev/null | tr ' ' '_')
        echo "ABFLIP-ROOT label=$label dev=$dev version=${rv:--}"
        umount /newroot
    fi
fi

@EXTRA@

if [ "@GOOD@" = "1" ]; then
    echo "ABFLIP-END action=poweroff uptime=$(uptime)"
    sync
    poweroff -f
else
    echo "ABFLIP-END action=panic uptime=$(uptime)"
    echo c > /proc/sysrq-trigger
fi
# Not reached; should it be, exiting init panics the kernel too.
exit 1
"""


def build_initramfs(
    out_path: str | os.PathLike[str],
    *,
    version: str,
    good: bool,
    modules_dir: str | os.PathLike[str],
    modules: Sequence[str] = DEFAULT_MODULES,
    mount_root: bool = True,
    root_fstype: str = "erofs",
    version_file: str = "/etc/abflip-version",
    extra_init: str = "",
    busybox: str | os.PathLike[str] = BUSYBOX,
) -> Path:
    """Write a gzip'd cpio initramfs standing in for OS `version` (good: powers off; bad: panics).

    The kernel command line (from the boot entry's `options`) should carry `console=ttyS0 panic=1` (so a bad image
    resets the VM), `abflip.slot=<a|b>` and `root=PARTLABEL=root-<slot>`. `extra_init` is shell code run after the
    report lines, before poweroff/panic.
    """
    if not re.fullmatch(r"[A-Za-z0-9.+~_-]+", version):
        raise ValueError(f"version must be a plain token, got {version!r}")
    mods = resolve_modules(modules_dir, modules)
    init = (
        _INIT_TEMPLATE.replace("@VERSION@", version)
        .replace("@KIND@", "good" if good else "bad")
        .replace("@GOOD@", "1" if good else "0")
        .replace("@MODULES@", " ".join(name for name, _ in mods))
        .replace("@GUID@", LOADER_GUID)
        .replace("@MOUNT_ROOT@", "1" if mount_root else "0")
        .replace("@ROOT_FSTYPE@", root_fstype)
        .replace("@VERSION_FILE@", version_file)
        .replace("@EXTRA@", extra_init)
    )
    archive = _Newc()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "newroot", "tmp"):
        archive.dir(d)
    archive.chardev("dev/console", 5, 1)
    archive.chardev("dev/null", 1, 3, 0o666)
    archive.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("etc/abflip-initrd-version", f"{version}\n".encode())
    for name, data in mods:
        archive.file(f"lib/modules/{name}.ko", data)
    archive.file("init", init.encode(), 0o755)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(gzip.compress(archive.finish(), compresslevel=6, mtime=0))
    log.info("built %s initramfs for %s: %s (%d bytes)", "good" if good else "bad", version, out, out.stat().st_size)
    return out


def build_rootfs_image(
    out_path: str | os.PathLike[str], *, version: str, version_file: str = "/etc/abflip-version"
) -> Path:
    """An erofs root filesystem holding `version_file` = `version` (what the guest reads back from its slot)."""
    out = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="abflip-rootfs-") as tmp:
        target = Path(tmp) / version_file.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(version + "\n")
        _run(["mkfs.erofs", "--quiet", "-T0", out, tmp])
    return out


@dataclasses.dataclass(frozen=True)
class OsVersion:
    """Boot files and root image of one stand-in OS version (see `build_os_version`)."""

    version: str
    good: bool
    vmlinuz: Path
    initrd: Path
    rootfs: Path


def build_os_version(
    out_dir: str | os.PathLike[str],
    *,
    version: str,
    good: bool,
    vmlinuz: str | os.PathLike[str],
    modules_dir: str | os.PathLike[str],
) -> OsVersion:
    """Initramfs + erofs root image for `version` in `out_dir` (file names carry the version and good/bad)."""
    out = Path(out_dir)
    tag = f"{version}-{'good' if good else 'bad'}"
    initrd = build_initramfs(out / f"initrd-{tag}.img", version=version, good=good, modules_dir=modules_dir)
    rootfs = build_rootfs_image(out / f"root-{tag}.erofs", version=version)
    return OsVersion(version, good, Path(vmlinuz), initrd, rootfs)


# ------------------------------------------------------------------------------------------------------- disk


@dataclasses.dataclass(frozen=True)
class Partition:
    number: int
    name: str
    offset: int  # bytes from the start of the disk
    size: int  # bytes


@dataclasses.dataclass(frozen=True)
class DiskLayout:
    """A GPT disk image built by `build_disk`: `partitions` by label (`esp`, `root-a`, `root-b`)."""

    path: Path
    partitions: dict[str, Partition]

    @property
    def esp_part(self) -> Partition:
        return self.partitions["esp"]

    def slot(self, slot: str) -> Partition:
        return self.partitions[f"root-{slot}"]


def build_disk(
    path: str | os.PathLike[str],
    *,
    esp_mib: int = 64,
    root_mib: int = 16,
    data_mib: int = 0,
    systemd_boot: str | os.PathLike[str] = SYSTEMD_BOOT_EFI,
    loader_conf: str = "timeout 0\nconsole-mode keep\neditor no\n",
) -> DiskLayout:
    """Create a sparse GPT disk: 1 = ESP (FAT32, `esp_mib`), 2 = `root-a`, 3 = `root-b` (`root_mib` each), and with
    `data_mib` 4 = `data` (left empty: the caller writes a filesystem image into it).

    The ESP gets systemd-boot as the removable-media loader `/EFI/BOOT/BOOTX64.EFI` (so a fresh OVMF varstore boots
    it with no Boot#### setup), `/loader/loader.conf` (`timeout 0`, no `default`: systemd-boot picks by its own
    ordering) and an empty `/loader/entries/`. Returns the partitions' byte offsets and sizes.
    """
    if esp_mib < 33:
        raise ValueError("FAT32 needs at least 33 MiB at 512-byte clusters")
    disk = Path(path)
    total = MiB + (esp_mib + 2 * root_mib + data_mib) * MiB + MiB  # 1 MiB alignment/primary GPT, backup GPT at the end
    with open(disk, "wb") as f:
        f.truncate(total)
    script = (
        "label: gpt\n"
        "first-lba: 2048\n"
        f'start=2048, size={esp_mib}MiB, type={ESP_TYPE}, name="esp"\n'
        f'size={root_mib}MiB, type={LINUX_TYPE}, name="root-a"\n'
        f'size={root_mib}MiB, type={LINUX_TYPE}, name="root-b"\n'
        + (f'size={data_mib}MiB, type={LINUX_TYPE}, name="data"\n' if data_mib else "")
    )
    _run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", disk], input=script.encode())
    table = json.loads(_run(["sfdisk", "--json", disk]).stdout)["partitiontable"]
    sector = int(table.get("sectorsize", SECTOR))
    parts = {}
    for i, p in enumerate(table["partitions"], start=1):
        parts[p["name"]] = Partition(i, p["name"], int(p["start"]) * sector, int(p["size"]) * sector)
    layout = DiskLayout(disk, parts)
    e = layout.esp_part
    # -s 1: 512-byte clusters, so 64 MiB has enough clusters to be FAT32 (the UEFI spec's ESP format).
    _run(
        [
            "mkfs.fat", "-F", "32", "-s", "1", "-n", "ESP",
            "--offset", str(e.offset // SECTOR), "-h", str(e.offset // SECTOR),
            disk, str(e.size // 1024),
        ]
    )  # fmt: skip
    fat = esp(layout)
    fat.makedirs("EFI/BOOT")
    fat.write_atomic("EFI/BOOT/BOOTX64.EFI", Path(systemd_boot).read_bytes())
    fat.write_atomic("loader/loader.conf", loader_conf.encode())
    fat.makedirs("loader/entries")
    fat.sync()
    log.info("built disk %s: %s", disk, {k: (v.offset, v.size) for k, v in parts.items()})
    return layout


def write_partition(layout: DiskLayout, name: str, image: str | os.PathLike[str]) -> None:
    """Copy a filesystem image into partition `name` (e.g. `root-a`) of the disk file; the rest is zeroed."""
    part = layout.partitions[name]
    size = os.path.getsize(image)
    if size > part.size:
        raise ValueError(f"{image} ({size} bytes) does not fit partition {name} ({part.size} bytes)")
    with open(layout.path, "r+b") as disk, open(image, "rb") as src:
        disk.seek(part.offset)
        shutil.copyfileobj(src, disk, 1 << 20)
        disk.write(b"\0" * min(part.size - size, 1 << 20))  # stale superblocks past the end would confuse probes
        disk.flush()
        os.fsync(disk.fileno())


def attach_loop(disk: str | os.PathLike[str], offset: int, size: int) -> str:
    """Attach a byte range of `disk` as a loop device (root); returns `/dev/loopN`."""
    out = _run(
        ["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size), disk], text=True
    ).stdout
    return out.strip()


def detach_loop(device: str) -> None:
    """Detach a loop device made by `attach_loop`."""
    _run(["losetup", "--detach", device])


@contextlib.contextmanager
def loop_partition(layout: DiskLayout, name: str) -> Iterator[str]:
    """`with loop_partition(layout, "root-b") as dev:` a loop device over that partition, detached afterwards."""
    part = layout.partitions[name]
    dev = attach_loop(layout.path, part.offset, part.size)
    try:
        yield dev
    finally:
        detach_loop(dev)


# -------------------------------------------------------------------------------------------------------- ESP


def esp(layout: DiskLayout) -> FatImageEsp:
    """The disk's ESP, as the applier's `Esp` interface (mtools at the partition's offset)."""
    return FatImageEsp(layout.path, offset=layout.esp_part.offset)


def list_entries(layout: DiskLayout) -> list[str]:
    """File names in `/loader/entries` (sorted)."""
    return esp(layout).listdir("loader/entries")


def read_esp_file(layout: DiskLayout, path: str) -> bytes:
    return esp(layout).read(path)


def write_esp_file(layout: DiskLayout, path: str, data: bytes) -> None:
    fat = esp(layout)
    fat.write_atomic(path, data)
    fat.sync()


def entry_text(
    version: str,
    slot: str,
    *,
    options: str = "",
    sort_key: str | None = "abflip",
    title: str | None = None,
    kernel_cmdline: str = "console=ttyS0 panic=1 loglevel=4",
) -> str:
    """A Boot Loader Specification Type #1 entry for OS `version` in `slot` (boot files under /abflip/<version>/)."""
    lines = [f"title {title or f'abflip {version} ({slot})'}", f"version {version}"]
    if sort_key is not None:
        lines.append(f"sort-key {sort_key}")
    lines += [
        f"linux /abflip/{version}/vmlinuz",
        f"initrd /abflip/{version}/initrd.img",
        f"options {kernel_cmdline} root=PARTLABEL=root-{slot} ro abflip.slot={slot} {options}".rstrip(),
    ]
    return "\n".join(lines) + "\n"


def install_os_version(
    layout: DiskLayout,
    *,
    version: str,
    slot: str,
    vmlinuz: str | os.PathLike[str],
    initrd: str | os.PathLike[str],
    rootfs: str | os.PathLike[str] | None = None,
) -> None:
    """Put `version`'s boot files at `/abflip/<version>/` on the ESP and, if given, its root image into the slot.

    Writes no entry: callers (or the applier under test) do.
    """
    fat = esp(layout)
    fat.write_atomic(f"abflip/{version}/vmlinuz", Path(vmlinuz).read_bytes())
    fat.write_atomic(f"abflip/{version}/initrd.img", Path(initrd).read_bytes())
    fat.sync()
    if rootfs is not None:
        write_partition(layout, f"root-{slot}", rootfs)


# ------------------------------------------------------------------------------------------------------- boot


@dataclasses.dataclass
class BootRecord:
    """One boot of the guest, from its ABFLIP-* lines."""

    version: str
    slot: str | None
    selected: str | None  # LoaderEntrySelected
    countpath: str | None  # LoaderBootCountPath (only set when the entry has a boot counter)
    entry: str | None  # countpath or selected
    uptime: float | None = None
    root_label: str | None = None
    root_device: str | None = None
    root_version: str | None = None
    root_error: str | None = None
    action: str | None = None  # "poweroff" / "panic" when the guest got that far
    host_time: float = 0.0  # seconds since QEMU started when the ABFLIP-BOOT line arrived

    @property
    def entry_file(self) -> str | None:
        """Basename of `entry` (e.g. `abflip-2.0.0-b+2-1.conf`)."""
        return self.entry.replace("\\", "/").rsplit("/", 1)[-1] if self.entry else None


@dataclasses.dataclass
class BootResult:
    boots: list[BootRecord]
    exit_code: int | None  # QEMU's exit status; None when it was killed at the timeout
    timed_out: bool
    duration_s: float
    log_path: Path

    @property
    def versions(self) -> list[str]:
        return [b.version for b in self.boots]

    @property
    def powered_off(self) -> bool:
        return not self.timed_out and self.exit_code == 0 and bool(self.boots) and self.boots[-1].action == "poweroff"

    def serial(self) -> str:
        return self.log_path.read_text(errors="replace")


_LINE_RE = re.compile(r"ABFLIP-(BOOT|ROOT|END|WARN)\b(.*)")


def _fields(text: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep:
            out[key] = None if value == "-" else value
    return out


def parse_serial(lines: Iterable[tuple[float, str]]) -> list[BootRecord]:
    """BootRecords from `(host_time, line)` pairs of serial output (firmware escape codes are tolerated)."""
    boots: list[BootRecord] = []
    for when, line in lines:
        match = _LINE_RE.search(line)
        if not match:
            continue
        kind, f = match.group(1), _fields(match.group(2))
        if kind == "BOOT":
            uptime = f.get("uptime")
            boots.append(
                BootRecord(
                    version=f.get("version") or "",
                    slot=f.get("slot"),
                    selected=f.get("selected"),
                    countpath=f.get("countpath"),
                    entry=f.get("entry"),
                    uptime=float(uptime) if uptime else None,
                    host_time=when,
                )
            )
        elif not boots:
            continue
        elif kind == "ROOT":
            boots[-1].root_label = f.get("label")
            boots[-1].root_device = f.get("dev")
            boots[-1].root_version = f.get("version")
            boots[-1].root_error = f.get("error")
        elif kind == "END":
            boots[-1].action = f.get("action")
    return boots


def fresh_vars(path: str | os.PathLike[str]) -> Path:
    """A fresh copy of OVMF's empty variable store (one per boot scenario: it holds systemd-boot's variables)."""
    dst = Path(path)
    shutil.copyfile(OVMF_VARS, dst)
    return dst


def boot(
    disk: str | os.PathLike[str] | DiskLayout,
    vars_path: str | os.PathLike[str],
    *,
    timeout_s: float,
    log_path: str | os.PathLike[str] | None = None,
    memory_mib: int = 512,
    extra_args: Sequence[str] = (),
    code: str | os.PathLike[str] | None = None,
    until: str | None = None,
) -> BootResult:
    """Boot the disk under QEMU (TCG, q35, OVMF) until the guest powers off or `timeout_s` passes.

    Serial output goes to `log_path` (default: `<disk>.serial.log`). A guest that panics with `panic=1` resets and
    boots again within the same run, so the result may hold several boots. `code`: another OVMF code image (the
    Secure Boot one). `until`: a regular expression; the first serial line matching it ends the run (QEMU killed,
    as a power cut would: a firmware waiting at its menu, say).
    """
    disk_path = disk.path if isinstance(disk, DiskLayout) else Path(disk)
    logfile = Path(log_path) if log_path is not None else disk_path.with_name(disk_path.name + ".serial.log")
    cmd = [
        "timeout", "--kill-after=5", str(int(timeout_s)),
        QEMU, "-accel", "tcg", "-machine", "q35", "-m", str(memory_mib), "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
        "-drive", f"if=pflash,format=raw,readonly=on,file={code or OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,file={vars_path}",
        "-drive", f"file={disk_path},format=raw,if=none,id=d0,cache=writeback",
        "-device", "virtio-blk-pci,drive=d0,bootindex=0",
        *extra_args,
    ]  # fmt: skip
    stop = re.compile(until) if until else None
    log.info("booting %s (timeout %ss), serial log %s", disk_path, timeout_s, logfile)
    lines: list[tuple[float, str]] = []
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def pump() -> None:
        assert proc.stdout is not None
        with open(logfile, "wb") as out:
            for raw in proc.stdout:
                out.write(raw)
                out.flush()
                text = raw.decode(errors="replace").replace("\r", "")
                lines.append((time.monotonic() - start, text.rstrip("\n")))
                if "ABFLIP-" in text:
                    log.info("guest: %s", text.strip())
                if stop is not None and stop.search(text):
                    log.info("serial line matched %r: stopping the guest", until)
                    proc.terminate()  # `timeout` passes SIGTERM on to QEMU

    reader = threading.Thread(target=pump, name="qemu-serial", daemon=True)
    reader.start()
    timed_out = False
    try:
        rc: int | None = proc.wait(timeout=timeout_s + 15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
        timed_out = True
    reader.join(timeout=10)
    duration = time.monotonic() - start
    if rc in (124, 137):  # coreutils timeout fired (TERM, then KILL)
        timed_out = True
        rc = None
    result = BootResult(parse_serial(lines), rc, timed_out, duration, logfile)
    log.info(
        "QEMU done after %.1fs: exit=%s timed_out=%s boots=%s",
        duration, rc, timed_out, [(b.version, b.entry_file, b.action) for b in result.boots],
    )  # fmt: skip
    return result
