"""The reference device (ci/reference-device/) under QEMU: a Debian 12 that runs abflip under its own units.

Building, in cached layers under `$ABFLIP_E2E_CACHE/device/` (default `~/.cache/abflip-e2e/device/`), each keyed by
the sha256 of its inputs, so a change to abflip rebuilds only the cheap layers:

* `base-<key>/`: `ci/reference-device/mkroot.sh` (debootstrap, about 2.5 min), keyed by the recipe (the script,
  its package list, `rootfs/`);
* `wheels-<key>/`: abflip and its dependencies as wheels, keyed by abflip's source tree and the versions this
  environment has installed;
* `images-<key>/`: the repository keys (`keys/`, `root.json`), and for each variant of `VARIANTS` the root tree
  (base + `add-abflip.sh` + the test files of `device_image/`) made into an erofs image by `abflip image build` and
  a release by `abflip release create` with the kernel and initrd from the base layer; keyed by the base and wheels
  keys and every file that goes into the images.

Running: `Device` is one machine: a GPT disk (ESP with systemd-boot and the factory's entry, `root-a` holding v1,
`root-b`, `data` holding the factory's release directory), its OVMF variables, a TUF repository served on
127.0.0.1, and `Guest`, one QEMU process (TCG, 1 vCPU), which the guest's own reboots do not end. The guest reaches
the repository as `http://10.0.2.100/` (user networking with `restrict=on`: a `guestfwd` rule is its only way out,
to the test's server). Evidence: the guest's serial console (ttyS0: systemd's boot messages, `ABFLIP-STATUS
{json}` at the end of each completed boot, `ABFLIP-HEALTH`/`ABFLIP-HANG` lines of the test units), and a root shell
on its second serial port (ttyS1), through which the test reads `abflip status --json` and the journal, and runs
operator commands.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from applier.bootloader.esp_fat import FatImageEsp

from . import vm

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = REPO_ROOT / "ci" / "reference-device"
TEST_FILES = Path(__file__).resolve().parent / "device_image"
PRODUCT = "reference-device"
#: `device.hardware_id = "dmi"` on QEMU's q35 machine: DMI product_name "Standard PC (Q35 + ICH9, 2009)".
HARDWARE = "standard-pc-q35-+-ich9-2009"
#: The kernel options of every release (the entry adds root=PARTLABEL=root-<slot> abflip.slot=<slot>).
OPTIONS = "rootfstype=erofs ro console=ttyS0,115200 panic=10 loglevel=4"
REPO_GUEST_ADDR = ("10.0.2.100", 80)
#: name -> (version, extra test files of device_image/)
VARIANTS = {
    "v1": ("1.0.0", ()),
    "v2": ("2.0.0", ()),
    "v2-bad": ("2.0.0", ("health-fails",)),
    "v2-hang": ("2.0.0", ("hang",)),
    "v3": ("3.0.0", ()),
}
WINDOW_START = (5, 1, 0)  # weekday (Saturday), hour, minute of device_image/abflip.toml's window, UTC
ROOT_MIB = 320
ESP_MIB = 96
DATA_MIB = 160
MEMORY_MIB = 1024
#: what the kernel prints as it resets the machine; silence after it for this long is a hung firmware
RESETTING = r"reboot: Restarting system"
RESET_SILENCE_S = 60
EPOCH = 1700000000

TOOLS = {"debootstrap": "debootstrap", "chroot": "coreutils", "mke2fs": "e2fsprogs", "mkfs.erofs": "erofs-utils",
         "zstd": "zstd"}


def missing_prerequisites() -> list[str]:
    """What the reference device needs besides vm.py's tools (named with their Debian packages)."""
    missing = vm.missing_prerequisites()
    missing += [f"{t} (apt: {p})" for t, p in TOOLS.items()
                if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    return missing


# ------------------------------------------------------------------------------------------------ cache keys


def _files(*paths: Path) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
        elif p.is_file():
            out.append(p)
    return out


def inputs_key(*parts: Path | str) -> str:
    """sha256 over files (their path relative to the repository, mode and content) and strings."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            h.update(b"s\0" + part.encode() + b"\0")
            continue
        for f in _files(part):
            rel = f.relative_to(REPO_ROOT) if f.is_relative_to(REPO_ROOT) else f
            h.update(f"f\0{rel}\0{f.stat().st_mode & 0o111}\0".encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _cache_entry(cache: Path, name: str) -> Iterator[tuple[Path, bool]]:
    """`(directory, ready)`: under an exclusive lock; a fresh build goes into a temporary directory that is renamed
    to `directory` when the block ends without an error (a killed build leaves no half entry)."""
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / name
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".complete").is_file():
            yield final, True
            return
        tmp = cache / f".{name}.building"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        yield tmp, False
        (tmp / ".complete").write_text(datetime.now(UTC).isoformat() + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        # the cache keeps the two newest entries of each layer (an image layer is ~1.5 GB)
        kind = name.rsplit("-", 1)[0]
        others = sorted((p for p in cache.glob(f"{kind}-*") if p != final and (p / ".complete").is_file()),
                        key=lambda p: (p / ".complete").stat().st_mtime)
        for old in others[:-1]:
            shutil.rmtree(old, ignore_errors=True)


def _run(cmd: list, *, timeout: float = 1800, **kw) -> subprocess.CompletedProcess:
    argv = [os.fspath(c) for c in cmd]
    log.info("run: %s", " ".join(argv))
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"command failed (exit {p.returncode}): {' '.join(argv)}\n{p.stdout[-4000:]}\n"
                           f"{p.stderr[-4000:]}")
    return p


def _abflip(*args) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "abflip.cli", *args], cwd=REPO_ROOT)


# ------------------------------------------------------------------------------------------------- layers


@dataclasses.dataclass(frozen=True)
class Base:
    dir: Path
    key: str
    seconds: float  # build time (0 when it came from the cache)

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def vmlinuz(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"


def build_base(cache: Path) -> Base:
    key = inputs_key(RECIPE / "mkroot.sh", RECIPE / "rootfs")
    t0 = time.monotonic()
    with _cache_entry(cache, f"base-{key}") as (d, ready):
        if not ready:
            _run(["bash", RECIPE / "mkroot.sh", d], timeout=3600)
    return Base(cache / f"base-{key}", key, 0.0 if ready else time.monotonic() - t0)


def _installed_versions() -> str:
    from importlib.metadata import distributions

    return "\n".join(sorted(f"{d.metadata['Name']}=={d.version}" for d in distributions()))


def build_wheels(cache: Path) -> Path:
    """abflip and its dependencies as wheels for the image (the dependencies at the versions installed here)."""
    src = [REPO_ROOT / n for n in ("abflip", "applier", "builder", "metadata", "pyproject.toml")]
    key = inputs_key(*src, _installed_versions())
    with _cache_entry(cache, f"wheels-{key}") as (d, ready):
        if not ready:
            constraints = d / "constraints.txt"
            constraints.write_text("\n".join(line for line in _installed_versions().splitlines()
                                             if not line.lower().startswith("abflip==")) + "\n")
            with tempfile.TemporaryDirectory() as tmp:  # a copy: the build must not leave build/ in the checkout
                tree = Path(tmp) / "abflip"
                tree.mkdir()
                for p in src:
                    (shutil.copytree if p.is_dir() else shutil.copy2)(p, tree / p.name)
                # the package's long description only: not an input of the image (a README edit rebuilds nothing)
                (tree / "README.md").write_text("abflip: atomic A/B OS image updates (see the project's README).\n")
                _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--only-binary=:all:",
                      "--no-binary=abflip", "--constraint", constraints, "--wheel-dir", d, tree], timeout=900)
    return cache / f"wheels-{key}"


@dataclasses.dataclass(frozen=True)
class Release:
    name: str
    version: str
    image: Path
    dir: Path  # what `abflip release create` wrote


@dataclasses.dataclass(frozen=True)
class Images:
    dir: Path
    key: str
    base: Base
    releases: dict[str, Release]
    seconds: float
    sizes: dict

    @property
    def keys(self) -> Path:
        return self.dir / "keys"

    @property
    def repo_template(self) -> Path:
        return self.dir / "repo"


def _install_tree(src: Path, dst: Path) -> None:
    """Copy test files into the image tree, root-owned and not writable by others (hooks are checked)."""
    for f in sorted(src.rglob("*")):
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            os.chmod(target, 0o755)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
        os.chmod(target, 0o755 if os.access(f, os.X_OK) else 0o644)
        os.chown(target, 0, 0)


def build_images(cache: Path) -> Images:
    from builder.publish import write_signed
    from builder.storage.local import LocalStorage
    from metadata.repository import init_repository

    base = build_base(cache)
    wheels = build_wheels(cache)
    key = inputs_key(base.key, wheels.name, RECIPE / "add-abflip.sh", RECIPE / "abflip-factory.service",
                     REPO_ROOT / "ci" / "image-install.sh", REPO_ROOT / "systemd", TEST_FILES, OPTIONS,
                     repr(VARIANTS))
    t0 = time.monotonic()
    with _cache_entry(cache, f"images-{key}") as (d, ready):
        if not ready:
            write_signed(LocalStorage(d / "repo"), init_repository(d / "keys"))
            root_json = d / "root.json"
            shutil.copyfile(d / "repo" / "metadata" / "1.root.json", root_json)
            layer = d / "layer"  # base + abflip, the version left to each variant
            _run(["cp", "-a", base.root, layer])
            _run(["bash", RECIPE / "add-abflip.sh", layer, wheels, TEST_FILES / "abflip.toml", root_json, "0.0.0"])
            _install_tree(TEST_FILES / "common", layer)
            for unit in ("abflip-e2e-shell.service", "abflip-e2e-report.service"):
                _run(["systemctl", f"--root={layer}", "--quiet", "enable", unit])
            sizes: dict = {"root_tree_bytes": _tree_bytes(layer)}
            for name, (version, extras) in VARIANTS.items():
                tree = d / f"tree-{name}"
                _run(["cp", "-a", layer, tree])
                osr = tree / "etc" / "os-release"
                osr.write_text(osr.read_text().replace("IMAGE_VERSION=0.0.0", f"IMAGE_VERSION={version}"))
                for extra in extras:
                    _install_tree(TEST_FILES / extra, tree)
                if "hang" in extras:
                    _run(["systemctl", f"--root={tree}", "--quiet", "enable", "abflip-e2e-hang.service"])
                image = d / f"{name}.erofs"
                _abflip("image", "build", tree, "-o", image, "--source-date-epoch", str(EPOCH))
                _abflip("release", "create", "--image", image, "--product", PRODUCT, "--version", version,
                        "--compatible", HARDWARE, "--kernel", base.vmlinuz, "--initrd", base.initrd,
                        "--options", OPTIONS, "--level", "6", "-o", d / f"release-{name}")
                shutil.rmtree(tree)
                sizes[name] = {"image_bytes": image.stat().st_size,
                               "compressed_bytes": sum(f.stat().st_size for f in (d / f"release-{name}").rglob("*.zst"))}
            shutil.rmtree(layer)
            sizes["kernel_bytes"] = base.vmlinuz.stat().st_size
            sizes["initrd_bytes"] = base.initrd.stat().st_size
            (d / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    d = cache / f"images-{key}"
    releases = {n: Release(n, v, d / f"{n}.erofs", d / f"release-{n}") for n, (v, _) in VARIANTS.items()}
    return Images(d, key, base, releases, 0.0 if ready else time.monotonic() - t0,
                  json.loads((d / "sizes.json").read_text()))


def _tree_bytes(root: Path) -> int:
    return sum(f.lstat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())


# --------------------------------------------------------------------------------------------------- disk


FACTORY_ENTRY = """\
title reference-device {version} (factory)
linux /factory/vmlinuz
initrd /factory/initrd.img
options {root} abflip.slot=a {options}
"""
#: A release whose boot file is a UKI (`release create --build-uki`): under Secure Boot its own command line counts.
FACTORY_UKI_ENTRY = """\
title reference-device {version} (factory)
efi /factory/uki.efi
options {root} abflip.slot=a {options}
"""


@dataclasses.dataclass(frozen=True)
class Firmware:
    """The machine's firmware: OVMF's code image, the variable store a new machine starts from, the QEMU options they
    need, and the systemd-boot the factory installs (tests/e2e/secureboot.py makes a Secure Boot one)."""

    code: Path = vm.OVMF_CODE
    vars: Path = vm.OVMF_VARS
    qemu_args: tuple[str, ...] = ()
    systemd_boot: Path = vm.SYSTEMD_BOOT_EFI


def flash_disk(path: Path, release: Release, workdir: Path, *, firmware: Firmware = Firmware()) -> vm.DiskLayout:
    """What a factory writes: the GPT disk, systemd-boot with the factory's own entry booting slot a, the release's
    image in `root-a` (and after it the verity tree `release create --verity` wrote beside the image), and a `data`
    filesystem holding the release directory at /var/lib/abflip-factory (the first boot's `abflip-factory.service`
    provisions from it)."""
    from metadata.verity import Verity, kernel_args

    layout = vm.build_disk(path, esp_mib=ESP_MIB, root_mib=ROOT_MIB, data_mib=DATA_MIB,
                           systemd_boot=firmware.systemd_boot)
    vm.write_partition(layout, "root-a", release.image)
    tail = release.dir / "rootfs.verity"
    if tail.is_file():  # what follows the image in the slot: zeros to the next 4 KiB, then the hash tree
        with open(layout.path, "r+b") as disk:
            disk.seek(layout.slot("a").offset + release.image.stat().st_size)
            disk.write(tail.read_bytes())
    esp = FatImageEsp(layout.path, offset=layout.esp_part.offset)
    manifest = json.loads((release.dir / "release.json").read_text())
    verity = manifest["image"].get("verity")
    root = kernel_args(Verity.from_json(verity), "PARTLABEL=root-a") if verity else "root=PARTLABEL=root-a"
    uki = (release.dir / "uki.efi").is_file()
    esp.makedirs("factory")
    for name in ("uki.efi",) if uki else ("vmlinuz", "initrd.img"):
        esp.write_atomic(f"factory/{name}", (release.dir / name).read_bytes())
    esp.write_atomic("loader/entries/factory.conf", (FACTORY_UKI_ENTRY if uki else FACTORY_ENTRY).format(
        version=release.version, root=root, options=manifest["boot"]["options"]).encode())
    esp.sync()
    tree = workdir / "data-tree"
    factory = tree / "lib" / "abflip-factory"
    factory.mkdir(parents=True)
    for f in release.dir.iterdir():
        if f.is_file() and not f.name.endswith((".zst", ".verity")):
            shutil.copy2(f, factory / f.name)
    data = workdir / "data.ext4"
    _run(["mke2fs", "-q", "-t", "ext4", "-L", "data", "-d", tree, data, f"{DATA_MIB}M"])
    vm.write_partition(layout, "data", data)
    data.unlink()
    shutil.rmtree(tree)
    return layout


# ---------------------------------------------------------------------------------------------------- guest


RELAY = r"""
import socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def up():
    while data := sys.stdin.buffer.read1(65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    sys.stdout.buffer.write(data); sys.stdout.buffer.flush()
"""


def last_window_start(now: datetime | None = None) -> datetime:
    """The most recent Saturday 01:00 UTC before `now` (the guest's clock is set relative to it; in the past, so the
    repository's metadata, signed now, has not expired on the guest's clock)."""
    now = now or datetime.now(UTC)
    wd, hour, minute = WINDOW_START
    start = (now - timedelta(days=(now.weekday() - wd) % 7)).replace(hour=hour, minute=minute, second=0, microsecond=0)
    return start if start < now else start - timedelta(days=7)


class Guest:
    """One QEMU process on the device's disk: `-rtc base=` sets the guest's clock; reboots stay in this process,
    unless the firmware hangs on the warm reset (see `_watchdog`)."""

    def __init__(self, device: Device, *, clock: datetime, name: str) -> None:
        self.device = device
        work = device.work
        self.serial_log = work / f"serial-{name}.log"
        self.shell_log = work / f"shell-{name}.log"
        self.sock_path = Path(tempfile.mkdtemp(prefix="abflip-e2e-")) / "ttyS1"
        self._relay = work / "relay.py"
        self._relay.write_text(RELAY)
        self.clock = clock
        self.started = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self.power_cycles = 0  # by the watchdog
        self._cycling = False
        self._closed = False
        self._stop = threading.Event()
        self._shell_buf = b""
        self._shell_seq = 0
        self._shell: socket.socket | None = None
        self._shell_reader: threading.Thread | None = None
        self._launch(clock)
        self._dog = threading.Thread(target=self._watchdog, daemon=True)
        self._dog.start()

    def _launch(self, clock: datetime) -> None:
        device = self.device
        host, port = REPO_GUEST_ADDR
        netdev = (f"user,id=n0,restrict=on,guestfwd=tcp:{host}:{port}-cmd:{sys.executable} {self._relay} "
                  f"{device.server.httpd.server_address[1]}")
        cmd = [
            vm.QEMU, "-accel", "tcg", "-machine", "q35", "-m", str(MEMORY_MIB), "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-rtc", f"base={clock.strftime('%Y-%m-%dT%H:%M:%S')},clock=host", *device.firmware.qemu_args,
            "-drive", f"if=pflash,format=raw,readonly=on,file={device.firmware.code}",
            "-drive", f"if=pflash,format=raw,file={device.vars}",
            "-drive", f"file={device.layout.path},format=raw,if=none,id=d0,cache=writeback",
            "-device", "virtio-blk-pci,drive=d0,bootindex=0",
            "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0",
            "-device", "virtio-rng-pci",
            "-serial", "stdio",
            "-chardev", f"socket,id=ctl,path={self.sock_path},server=on,wait=off", "-serial", "chardev:ctl",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    # -- the watchdog
    def _watchdog(self) -> None:
        """A device's hardware watchdog, for one known fault of the test machine: QEMU 7.2's TCG with SMM (the Secure
        Boot firmware) sometimes never leaves the warm reset after the kernel's "reboot: Restarting system" (no
        firmware output at all; seen once in three reboots; a reset from the monitor does not show it). The firmware's
        first line normally follows in 3-7 s; after RESET_SILENCE_S of silence the QEMU process is killed and started
        again on the same disk and variable store (a cold power cycle, the clock carried on), noted in the transcript
        and counted in `power_cycles`. Nothing abflip wrote is involved: the firmware has not read the disk yet."""
        reset = re.compile(RESETTING)
        while not self._stop.wait(5):
            with self._cond:
                if self._closed or self.proc.poll() is not None:
                    return
                if not self.lines or not reset.search(self.lines[-1][1]):
                    continue
                silent = time.monotonic() - self.started - self.lines[-1][0]
                if silent < RESET_SILENCE_S:
                    continue
                self._cycling = True
            log.warning("guest %s: no output %.0f s after its reset: power-cycled", self.serial_log.name, silent)
            self._kill()
            self._reader.join(timeout=10)
            note = (f"[e2e watchdog] no output {silent:.0f} s after the reset (QEMU TCG + SMM warm-reset hang): "
                    "power-cycled")
            with open(self.serial_log, "ab") as out:
                out.write(note.encode() + b"\n")
            if self._shell is not None:
                self._shell.close()  # the connection of the QEMU that is gone
                self._shell = None
            self.sock_path.unlink(missing_ok=True)
            with self._cond:
                if self._closed:
                    self._cycling = False
                    return
                self.lines.append((time.monotonic() - self.started, note))
                self.power_cycles += 1
                self._launch(self.clock + timedelta(seconds=time.monotonic() - self.started))
                self._cycling = False
                self._cond.notify_all()

    # -- ttyS0
    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with open(self.serial_log, "ab") as out:
            for raw in self.proc.stdout:
                out.write(raw)
                out.flush()
                text = raw.decode(errors="replace").replace("\r", "").rstrip("\n")
                with self._cond:
                    self.lines.append((time.monotonic() - self.started, text))
                    self._cond.notify_all()
                if "ABFLIP-" in text:
                    log.info("guest: %s", text[:300])
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, pattern: str, *, after: int = 0, timeout: float) -> tuple[int, re.Match]:
        """The first serial line at index >= `after` matching `pattern`: (index, match)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.lines)):
                    if m := rx.search(self.lines[i][1]):
                        return i, m
                after = max(after, len(self.lines))
                left = deadline - time.monotonic()
                if left <= 0 or (not self._cycling and self.proc.poll() is not None and not self._reader.is_alive()):
                    raise TimeoutError(f"no serial line matching {pattern!r} within {timeout:.0f} s "
                                       f"(QEMU {'exited ' + str(self.proc.returncode) if self.proc.poll() is not None else 'running'})"
                                       f"\n{self.tail()}")
                self._cond.wait(min(left, 1.0))

    def wait_status(self, *, after: int = 0, timeout: float) -> tuple[int, dict]:
        """The next `ABFLIP-STATUS {json}` line the report unit prints at the end of a completed boot."""
        i, m = self.wait_line(r"ABFLIP-STATUS (\{.*\})\s*$", after=after, timeout=timeout)
        return i, json.loads(m.group(1))

    def wait_boot(self, *, after: int, timeout: float) -> int:
        """The index of the next boot's first line (systemd's greeting) after line `after`."""
        return self.wait_line(r"Welcome to ", after=after, timeout=timeout)[0]

    def boots(self) -> int:
        """Boots so far (systemd greets each one on ttyS0: "Welcome to Debian GNU/Linux 12 (bookworm)!")."""
        with self._cond:
            return sum(1 for _, line in self.lines if "Welcome to " in line)

    def tail(self, n: int = 60) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines[-n:])

    def grep(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        with self._cond:
            return [line for _, line in self.lines if rx.search(line)]

    # -- ttyS1: the test's root shell
    def _connect(self) -> None:
        if self._shell is not None:
            return
        deadline = time.monotonic() + 30
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(self.sock_path))
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self._shell = s
        self._shell_reader = threading.Thread(target=self._pump_shell, daemon=True)
        self._shell_reader.start()

    def _pump_shell(self) -> None:
        assert self._shell is not None
        with open(self.shell_log, "ab") as out:
            while True:
                try:
                    data = self._shell.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                out.write(data)
                out.flush()
                with self._cond:
                    self._shell_buf += data
                    self._cond.notify_all()

    def wait_shell(self, *, timeout: float, not_boot: str | None = None) -> str:
        """Wait until the shell of a boot other than `not_boot` answers; returns that boot's id. (Probes are sent
        every second: what reaches the serial port before the shell opens it is lost.)"""
        deadline = time.monotonic() + timeout
        rx = re.compile(rb"@@E2E-SHELL-READY (\S+)\n")
        while True:
            try:  # the connection goes with the QEMU process when the watchdog power-cycles it
                self._connect()
                shell = self._shell
                if shell is None:  # dropped by the watchdog since
                    raise ConnectionError("the guest's shell connection is gone")
                shell.sendall(b"\necho @@E2E-SHELL-READY $(cat /proc/sys/kernel/random/boot_id)\n")
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
                continue
            with self._cond:
                self._cond.wait(1.0)
                ms = [m for m in rx.finditer(self._shell_buf) if m.group(1).decode() != not_boot]
                if ms:
                    time.sleep(0.5)  # let the answers to earlier probes arrive, then drop them
                    self._shell_buf = b""
                    return ms[-1].group(1).decode()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the guest's shell did not come up within {timeout:.0f} s\n{self.tail()}")

    def sh(self, command: str, *, timeout: float = 120, check: bool = True) -> tuple[int, str]:
        """Run `command` in the guest's root shell; (exit status, stdout+stderr)."""
        self._connect()
        assert self._shell is not None
        self._shell_seq += 1
        tag = f"{os.getpid()}-{self._shell_seq}"
        self._shell.sendall(f"echo @@B{tag}; ( {command} ) 2>&1; echo @@E{tag}:$?\n".encode())
        rx = re.compile(rb"@@B" + tag.encode() + rb"\n(.*?)@@E" + tag.encode() + rb":(\d+)\n", re.S)
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (m := rx.search(self._shell_buf)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"guest command {command!r} did not finish within {timeout:.0f} s\n"
                                       f"{self._shell_buf[-2000:].decode(errors='replace')}")
                self._cond.wait(min(left, 1.0))
            self._shell_buf = self._shell_buf[m.end():]
        rc, out = int(m.group(2)), m.group(1).decode(errors="replace")
        if check and rc != 0:
            raise AssertionError(f"guest command {command!r} exited {rc}:\n{out}")
        return rc, out

    def send(self, command: str) -> None:
        """Start `command` in the guest's shell without waiting for it (`systemctl reboot`: the shell goes with it)."""
        self._connect()
        assert self._shell is not None
        self._shell.sendall(f"( {command} ) >/dev/null 2>&1 &\n".encode())

    def abflip(self, args: str, *, timeout: float = 300) -> tuple[int, str]:
        """`abflip <args>` in the guest; retried while the timer's own pass holds the device lock."""
        deadline = time.monotonic() + timeout
        while True:
            rc, out = self.sh(f"/usr/local/bin/abflip {args}", timeout=timeout, check=False)
            if "another abflip command is running" not in out or time.monotonic() > deadline:
                return rc, out
            time.sleep(2)

    def status(self) -> dict:
        return json.loads(self.sh("/usr/local/bin/abflip status --json")[1])

    def journal(self, *args: str) -> str:
        return self.sh("journalctl --no-pager -q " + " ".join(args))[1]

    # -- power
    def power_cut(self) -> None:
        """The QEMU process killed: what the guest had not written to its disk is lost."""
        self._stop_watchdog()
        self._kill()
        self._close()

    def _kill(self) -> None:
        """SIGKILL to QEMU's process group (QEMU and its guestfwd relays), and its exit reaped."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def wait_exit(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the guest did not power off within {timeout:.0f} s\n{self.tail()}") from None
        self._close()
        return rc

    def _stop_watchdog(self) -> None:
        with self._cond:
            self._closed = True
        self._stop.set()
        self._dog.join(timeout=30)

    def _close(self) -> None:
        self._stop_watchdog()
        self._reader.join(timeout=10)
        with self._cond, open(self.serial_log.with_suffix(".times"), "w") as out:  # host seconds since power-on
            out.writelines(f"{t:8.1f} {line}\n" for t, line in self.lines)
        if self._shell is not None:
            self._shell.close()
            self._shell = None
        shutil.rmtree(self.sock_path.parent, ignore_errors=True)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.power_cut()
        else:
            self._close()


class Device:
    """A flashed reference device and its repository (see the module docstring)."""

    def __init__(self, work: Path, images: Images, *, handler=None, releases: dict[str, Release] | None = None,
                 factory: str = "v1", firmware: Firmware = Firmware()) -> None:
        from abflip.httpserver import RepoHandler, Server
        from builder.storage.local import LocalStorage
        from metadata.keys import KeyConfig

        self.work = work
        self.images = images
        self.repo = work / "repo"
        shutil.copytree(images.repo_template, self.repo)
        self.storage = LocalStorage(self.repo)
        self.keys = KeyConfig.load(images.keys)
        self.server = Server(self.repo, handler=handler or RepoHandler)
        self.server.__enter__()
        self.releases = {**images.releases, **(releases or {})}  # the images' and others (verity, signed UKIs)
        self.firmware = firmware
        self.layout = flash_disk(work / "disk.img", self.releases[factory], work, firmware=firmware)
        self.vars = work / "OVMF_VARS.fd"
        shutil.copyfile(firmware.vars, self.vars)
        self.guests: list[Guest] = []

    def publish(self, name: str) -> None:
        from builder.publish import publish_release

        publish_release(self.releases[name].dir, self.storage, self.keys, channel="stable")

    def power_on(self, *, clock: datetime) -> Guest:
        g = Guest(self, clock=clock, name=str(len(self.guests) + 1))
        self.guests.append(g)
        return g

    def entries(self) -> list[str]:
        return vm.list_entries(self.layout)

    def close(self) -> None:
        for g in self.guests:
            g.close()
        self.server.__exit__(None, None, None)
