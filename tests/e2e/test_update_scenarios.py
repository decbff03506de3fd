"""The real applier updates a real disk that real firmware boots (OVMF + systemd-boot 252 under QEMU).

Each scenario builds a GPT disk (ESP + root-a + root-b) with v1 factory-installed in slot a behind a blessed entry,
serves a TUF repository on 127.0.0.1 holding v2, and runs `applier.agent.Device` on the host against the disk
between QEMU runs:

* the slots are the disk's partitions, attached as loop devices and reached through symlinks named in the config
  (like `/dev/disk/by-partlabel/root-b`); the loops are detached (and the symlinks removed) while QEMU runs;
* the ESP is the disk's first partition, through mtools (`FatImageEsp(disk, offset=...)`);
* the "booted system" (`/proc/cmdline`, efivarfs) is what the guest reported on its serial console in its last
  boot: the kernel command line it was started with and systemd-boot's `LoaderEntrySelected` /
  `LoaderBootCountPath`, written back as efivarfs files (4-byte attributes + UTF-16LE, NUL-terminated).

OS versions are built with abflip's own producer: an erofs root image (`builder.image.build_image`) of a tree holding
`/etc/abflip-version`, the Debian kernel, and a busybox initramfs that reports and powers off (good) or panics (bad);
`builder.release.create_release` + `builder.publish.publish_release` put them into the repository.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from abflip.httpserver import RepoHandler, Server
from applier.agent import Device
from applier.config import Config
from applier.context import LOADER_GUID, Context
from applier.bootloader.esp_fat import FatImageEsp
from builder.image import build_image
from builder.publish import publish_release, write_signed
from builder.release import ReleaseFiles, create_release
from builder.storage.local import LocalStorage
from metadata.errors import PolicyError
from metadata.keys import KeyConfig
from metadata.repository import init_repository

from . import vm

PRODUCT = "e2e-os"
HARDWARE = "qemu-q35-ovmf"
#: Kernel options of every release. The applier's entry reads
#: `options root=PARTLABEL=root-<slot> abflip.slot=<slot> <these>`, the same command line as `vm.entry_text`'s.
OPTIONS = "console=ttyS0 panic=1 loglevel=4 ro"
CHUNK = 1 << 20  # small chunks, so the image has several and an install can be killed between them
V2_FILLER = 6 << 20  # incompressible bytes in v2's root image: ~7 chunks
EPOCH = 1700000000
ONE_BOOT_TIMEOUT_S = 150  # one boot takes ~13 s under TCG here
ROLLBACK_TIMEOUT_S = 300  # three failing boots and the good one: ~60 s here
REPO_ROOT = Path(__file__).resolve().parents[2]

#: Run by each stand-in OS after its report lines: the kernel command line, which becomes the host-side
#: `/proc/cmdline` stand-in for the applier's next run.
CMDLINE_REPORT = 'echo "ABFLIP-CMDLINE $(cat /proc/cmdline)"'
_CMDLINE_RE = re.compile(r"ABFLIP-CMDLINE (.*)")

#: `abflip install` for a device whose ESP is a partition of a disk image (the CLI only knows directory ESPs).
_INSTALL_SCRIPT = """
import sys
from pathlib import Path
from applier.agent import Device
from applier.config import Config
from applier.bootloader.esp_fat import FatImageEsp
config = Config.load(Path(sys.argv[1]))
Device(config, esp=FatImageEsp(sys.argv[2], offset=int(sys.argv[3]))).install()
"""


# ------------------------------------------------------------------------------------------------ builds


@dataclasses.dataclass(frozen=True)
class OsRelease:
    version: str
    good: bool
    image: Path  # the erofs root image (builder.image.build_image)
    initrd: Path
    vmlinuz: Path
    release: ReleaseFiles

    @property
    def dir(self) -> Path:
        return self.release.dir


@dataclasses.dataclass(frozen=True)
class Releases:
    v1: OsRelease
    v2: OsRelease
    v2_bad: OsRelease


@pytest.fixture(scope="module")
def releases(kernel: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Releases:
    vmlinuz, modules_dir = kernel
    out = tmp_path_factory.mktemp("releases")
    images: dict[str, Path] = {}

    def rootfs(version: str) -> Path:
        """One image per version (good and bad 2.0.0 share it); 2.0.0's is several chunks of incompressible bytes."""
        filler = V2_FILLER if version == "2.0.0" else 0
        if version not in images:
            tree = out / f"tree-{version}"
            (tree / "etc").mkdir(parents=True)
            (tree / "etc" / "abflip-version").write_text(version + "\n")
            if filler:
                (tree / "usr" / "lib").mkdir(parents=True)
                (tree / "usr" / "lib" / "filler.bin").write_bytes(random.Random(version).randbytes(filler))
            images[version] = build_image(tree, out / f"root-{version}.erofs", source_date_epoch=EPOCH).path
        return images[version]

    def make(version: str, good: bool) -> OsRelease:
        tag = f"{version}-{'good' if good else 'bad'}"
        initrd = vm.build_initramfs(out / f"initrd-{tag}.img", version=version, good=good, modules_dir=modules_dir,
                                    extra_init=CMDLINE_REPORT)
        image = rootfs(version)
        rel = create_release(image, out / f"release-{tag}", product=PRODUCT, version=version, compatible=[HARDWARE],
                             kernel=vmlinuz, initrd=initrd, options=OPTIONS, level=3, chunk_size=CHUNK, window=CHUNK,
                             created=EPOCH)
        return OsRelease(version, good, image, initrd, Path(vmlinuz), rel)

    return Releases(v1=make("1.0.0", True), v2=make("2.0.0", True), v2_bad=make("2.0.0", False))


class ThrottledHandler(RepoHandler):
    """Serves images (`*.zst`) in 64 KiB pieces with `delay` seconds between them (0: full speed)."""

    delay = 0.0

    def send_bytes(self, data, start: int, end: int) -> None:  # type: ignore[no-untyped-def]
        delay = type(self).delay
        if not delay or not self.path.endswith(".zst"):
            return super().send_bytes(data, start, end)
        view = memoryview(data)[start:end]
        for i in range(0, len(view), 64 << 10):
            self.wfile.write(view[i : i + (64 << 10)])
            time.sleep(delay)


# -------------------------------------------------------------------------------------------------- rig


def _efivar(value: str) -> bytes:
    return (6).to_bytes(4, "little") + (value + "\0").encode("utf-16-le")  # BS|RT, as systemd-boot sets them


def _explain(result: vm.BootResult) -> str:
    tail = "\n".join(result.serial().splitlines()[-40:])
    return f"{result!r}\n--- serial log tail ({result.log_path}) ---\n{tail}"


class Rig:
    """One device: the disk image, its OVMF variable store, the applier's config/state/context, and the repository
    it updates from (served on 127.0.0.1 for the rig's life)."""

    def __init__(self, tmp: Path, handler: type[RepoHandler]) -> None:
        self.tmp = tmp
        self.layout = vm.build_disk(tmp / "disk.img")
        self.vars = vm.fresh_vars(tmp / "OVMF_VARS.fd")  # one per scenario, kept across its boots
        self.devdir = tmp / "dev"  # symlinks root-a/root-b -> /dev/loopN while attached
        self.devdir.mkdir()
        # The host's own root is not the guest's: no mounted root to compare with the booted slot (boot-check's
        # root confirmation is skipped when it cannot be read, as on the simulated device).
        self.ctx = Context(cmdline=tmp / "ctx" / "cmdline", efivars=tmp / "ctx" / "efivars", root=tmp / "ctx" / "no-root")
        self.ctx.efivars.mkdir(parents=True)
        self.loops: dict[str, str] = {}
        self.boots = 0
        self.repo = tmp / "repo"
        self.storage = LocalStorage(self.repo)
        write_signed(self.storage, init_repository(tmp / "keys"))
        self.keys = KeyConfig.load(tmp / "keys")
        self.server = Server(self.repo, handler=handler)
        self.server.__enter__()
        (tmp / "root.json").write_bytes((self.repo / "metadata" / "1.root.json").read_bytes())
        self.config_path = tmp / "abflip.toml"
        self.config_path.write_text(f"""\
[repository]
url = "{self.server.url}"
trusted_root = "root.json"

[device]
product = "{PRODUCT}"
channel = "stable"
hardware_id = "{HARDWARE}"

[slots]
a = {{ device = "dev/root-a", partlabel = "root-a" }}
b = {{ device = "dev/root-b", partlabel = "root-b" }}

[paths]
esp = "unused-esp-dir"
state_dir = "state"
cmdline = "ctx/cmdline"
efivars = "ctx/efivars"

[boot]
tries = 3

[network]
timeout = 10
retries = 2
""")

    def close(self) -> None:
        self.detach()
        self.server.__exit__(None, None, None)

    # -- the device's parts
    @property
    def esp(self) -> FatImageEsp:
        return FatImageEsp(self.layout.path, offset=self.layout.esp_part.offset)

    @property
    def state(self) -> dict:
        return json.loads((self.tmp / "state" / "state.json").read_text())

    def device(self) -> Device:
        return Device(Config.load(self.config_path), ctx=self.ctx, esp=self.esp)

    def entries(self) -> list[str]:
        return vm.list_entries(self.layout)

    def slot_bytes(self, slot: str, length: int) -> bytes:
        part = self.layout.slot(slot)
        with open(self.layout.path, "rb") as f:
            f.seek(part.offset)
            return f.read(length)

    def publish(self, rel: OsRelease) -> None:
        publish_release(rel.dir, self.storage, self.keys, channel="stable")

    # -- slots as loop devices
    def attach(self) -> None:
        for slot in "ab":
            part = self.layout.slot(slot)
            dev = vm.attach_loop(self.layout.path, part.offset, part.size)
            self.loops[slot] = dev
            (self.devdir / f"root-{slot}").symlink_to(dev)

    def detach(self) -> None:
        for slot, dev in list(self.loops.items()):
            (self.devdir / f"root-{slot}").unlink(missing_ok=True)
            vm.detach_loop(dev)  # the last close flushes the loop's buffers into the disk file
            del self.loops[slot]

    @contextlib.contextmanager
    def slots_attached(self) -> Iterator[None]:
        self.attach()
        try:
            yield
        finally:
            self.detach()

    # -- the booted system
    def set_booted(self, cmdline: str, selected: str | None, countpath: str | None) -> None:
        self.ctx.cmdline.write_text(cmdline + "\n")
        for name, value in (("LoaderEntrySelected", selected), ("LoaderBootCountPath", countpath)):
            path = self.ctx.efivars / f"{name}-{LOADER_GUID}"
            if value is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(_efivar(value))

    def set_booted_from(self, result: vm.BootResult) -> vm.BootRecord:
        """The context of the guest's last boot: its /proc/cmdline and systemd-boot's variables."""
        last = result.boots[-1]
        cmdlines = [m.group(1).strip() for line in result.serial().splitlines() if (m := _CMDLINE_RE.search(line))]
        assert cmdlines and f"abflip.slot={last.slot}" in cmdlines[-1].split(), _explain(result)
        self.set_booted(cmdlines[-1], last.selected, last.countpath)
        return last

    def boot(self, timeout_s: float) -> vm.BootResult:
        assert not self.loops, "detach the slots before booting"
        self.boots += 1
        return vm.boot(self.layout, self.vars, timeout_s=timeout_s, log_path=self.tmp / f"serial-{self.boots}.log")

    # -- factory
    def factory_install(self, v1: OsRelease) -> None:
        """v1 flashed into slot a as a factory would, then recorded by `abflip provision` (applier.provision): its boot
        files, a blessed entry and the state, from v1's release."""
        vm.write_partition(self.layout, "root-a", v1.image)
        self.set_booted(f"root=PARTLABEL=root-a abflip.slot=a {OPTIONS}", None, None)
        with self.slots_attached():
            result = self.device().provision(v1.dir)
            status = self.device().status()
        assert result["entry"] == f"abflip-{v1.version}-a.conf", result
        assert status["slots"]["a"]["status"] == "good" and status["booted_version"] == v1.version, status
        assert status["floor"] == v1.version, status


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("the slots are loop devices over the disk's partitions: needs root and losetup")
    r = Rig(tmp_path, type("Throttled", (ThrottledHandler,), {}))
    try:
        yield r
    finally:
        r.close()


def _assert_booted(result: vm.BootResult, version: str, slot: str, entry_file: str) -> None:
    assert result.powered_off, _explain(result)
    assert len(result.boots) == 1, _explain(result)
    b = result.boots[0]
    assert (b.version, b.slot, b.root_version, b.root_device) == (
        version, slot, version, {"a": "/dev/vda2", "b": "/dev/vda3"}[slot]), _explain(result)  # fmt: skip
    assert b.entry_file == entry_file, _explain(result)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -------------------------------------------------------------------------------------------- scenarios


@pytest.mark.e2e
def test_good_update_boots_new_slot_and_commits(rig: Rig, releases: Releases) -> None:
    """install v2 -> boot: v2 from slot b, entry counted +3 -> +2-1 -> mark-good: blessed, committed -> boot: v2."""
    v2 = releases.v2
    rig.factory_install(releases.v1)
    rig.publish(v2)

    with rig.slots_attached():
        result = rig.device().install()
    assert (result.version, result.slot, result.entry) == ("2.0.0", "b", "abflip-2.0.0-b+3.conf")
    assert rig.entries() == ["abflip-1.0.0-a.conf", "abflip-2.0.0-b+3.conf"]
    entry = rig.esp.read("loader/entries/abflip-2.0.0-b+3.conf").decode()
    assert f"options root=PARTLABEL=root-b abflip.slot=b {OPTIONS}\n" in entry
    size = v2.release.release.image.size
    assert _sha256(rig.slot_bytes("b", size)) == _sha256(v2.image.read_bytes())

    first = rig.boot(ONE_BOOT_TIMEOUT_S)
    _assert_booted(first, "2.0.0", "b", "abflip-2.0.0-b+2-1.conf")
    assert first.boots[0].selected == "abflip-2.0.0-b+3.conf"
    assert rig.entries() == ["abflip-1.0.0-a.conf", "abflip-2.0.0-b+2-1.conf"]

    rig.set_booted_from(first)
    dev = rig.device()
    assert dev.status()["state"] == "trial"
    status = dev.mark_good()
    assert status["state"] == "committed" and status["floor"] == "2.0.0", status
    assert status["booted_entry"] == "abflip-2.0.0-b.conf"
    assert rig.entries() == ["abflip-1.0.0-a.conf", "abflip-2.0.0-b.conf"]

    second = rig.boot(ONE_BOOT_TIMEOUT_S)
    _assert_booted(second, "2.0.0", "b", "abflip-2.0.0-b.conf")
    assert second.boots[0].countpath is None
    rig.set_booted_from(second)
    status = rig.device().status()
    assert (status["state"], status["booted_slot"], status["booted_entry"]) == ("committed", "b", "abflip-2.0.0-b.conf")


@pytest.mark.e2e
def test_bad_update_rolls_back_and_is_not_retried(rig: Rig, releases: Releases) -> None:
    """A v2 that panics burns its 3 tries in one QEMU run; systemd-boot then boots v1 by itself; the applier reports
    rolled-back and refuses 2.0.0 again."""
    rig.factory_install(releases.v1)
    rig.publish(releases.v2_bad)
    with rig.slots_attached():
        assert rig.device().install().entry == "abflip-2.0.0-b+3.conf"

    result = rig.boot(ROLLBACK_TIMEOUT_S)
    assert result.powered_off, _explain(result)
    assert [(b.version, b.slot, b.action) for b in result.boots] == [
        ("2.0.0", "b", "panic"),
        ("2.0.0", "b", "panic"),
        ("2.0.0", "b", "panic"),
        ("1.0.0", "a", "poweroff"),
    ], _explain(result)
    assert [b.entry_file for b in result.boots] == [
        "abflip-2.0.0-b+2-1.conf",
        "abflip-2.0.0-b+1-2.conf",
        "abflip-2.0.0-b+0-3.conf",
        "abflip-1.0.0-a.conf",
    ], _explain(result)
    assert result.boots[-1].root_version == "1.0.0"
    assert rig.entries() == ["abflip-1.0.0-a.conf", "abflip-2.0.0-b+0-3.conf"]

    booted = rig.set_booted_from(result)
    assert booted.countpath is None and booted.selected == "abflip-1.0.0-a.conf"
    with rig.slots_attached():
        dev = rig.device()
        status = dev.status()
        assert (status["state"], status["failed_versions"]) == ("rolled-back", ["2.0.0"]), status
        assert (status["booted_slot"], status["booted_version"], status["pending_entry"]) == ("a", "1.0.0", None)
        with pytest.raises(PolicyError, match="rolled back on this device before"):
            dev.install()
    state = rig.state
    assert state["state"] == "rolled-back" and state["failed_versions"] == ["2.0.0"]
    assert state["slots"]["b"]["status"] == "bad"
    assert rig.entries() == ["abflip-1.0.0-a.conf", "abflip-2.0.0-b+0-3.conf"]  # the refusal touched nothing


@pytest.mark.e2e
def test_interrupted_install_keeps_v1_bootable_then_resumes(rig: Rig, releases: Releases) -> None:
    """SIGKILL the applier while it writes slot b: the disk boots v1; the re-run resumes and v2 boots."""
    v2 = releases.v2
    chunks = len(v2.release.release.image.chunks)
    assert chunks >= 5, chunks
    rig.factory_install(releases.v1)
    rig.publish(v2)
    handler = rig.server.httpd.RequestHandlerClass
    handler.delay = 0.04  # ~1.6 MB/s: about 0.6 s per 1 MiB chunk

    with rig.slots_attached():
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        cmd = [sys.executable, "-c", _INSTALL_SCRIPT, str(rig.config_path), str(rig.layout.path),
               str(rig.layout.esp_part.offset)]
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(FileNotFoundError, ValueError):
                    st = rig.state
                    if st["state"] == "downloading" and st["target"]["chunks_done"] >= 1:
                        break
                if proc.poll() is not None:
                    pytest.fail(f"install ended (exit {proc.returncode}) before it could be killed:\n"
                                f"{proc.stdout.read().decode(errors='replace')}")  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "install wrote no chunk in 60 s"
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL
    killed = rig.state
    assert killed["state"] == "downloading", killed
    assert 1 <= killed["target"]["chunks_done"] < chunks, killed
    assert rig.entries() == ["abflip-1.0.0-a.conf"]  # nothing points at the half-written slot
    written = CHUNK * killed["target"]["chunks_done"]
    assert rig.slot_bytes("b", written) == v2.image.read_bytes()[:written]  # it was killed mid-way through slot b

    result = rig.boot(ONE_BOOT_TIMEOUT_S)
    _assert_booted(result, "1.0.0", "a", "abflip-1.0.0-a.conf")
    rig.set_booted_from(result)

    handler.delay = 0.0
    with rig.slots_attached():
        done = rig.device().install()
    assert (done.version, done.slot, done.entry) == ("2.0.0", "b", "abflip-2.0.0-b+3.conf")
    assert done.resumed_at_chunk == killed["target"]["chunks_done"]
    assert done.bytes_downloaded < v2.release.release.image.compressed_size
    assert _sha256(rig.slot_bytes("b", v2.release.release.image.size)) == _sha256(v2.image.read_bytes())
    assert rig.entries() == ["abflip-1.0.0-a.conf", "abflip-2.0.0-b+3.conf"]

    result = rig.boot(ONE_BOOT_TIMEOUT_S)
    _assert_booted(result, "2.0.0", "b", "abflip-2.0.0-b+2-1.conf")


@pytest.mark.e2e
def test_delta_update_boots_on_real_firmware(rig: Rig, releases: Releases, kernel: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    """Issue 12's proof on real firmware: 2.1.0 is 1.0.0's tree with a few files changed and carries a delta from
    1.0.0; a device provisioned with 1.0.0 installs it through the delta (every chunk verified against the booted
    slot or taken from the full image), and OVMF + systemd-boot boot the result from slot b."""
    v1 = releases.v1
    vmlinuz, modules_dir = kernel
    tree = tmp_path / "tree-2.1.0"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "abflip-version").write_text("2.1.0\n")
    (tree / "usr" / "lib").mkdir(parents=True)
    (tree / "usr" / "lib" / "library.bin").write_bytes(random.Random("delta").randbytes(1 << 20))
    image = build_image(tree, tmp_path / "root-2.1.0.erofs", source_date_epoch=EPOCH).path
    initrd = vm.build_initramfs(tmp_path / "initrd-2.1.0.img", version="2.1.0", good=True, modules_dir=modules_dir,
                                extra_init=CMDLINE_REPORT)
    rel = create_release(image, tmp_path / "release-2.1.0", product=PRODUCT, version="2.1.0", compatible=[HARDWARE],
                         kernel=vmlinuz, initrd=initrd, options=OPTIONS, level=3, chunk_size=CHUNK, window=CHUNK,
                         created=EPOCH, delta_from=[v1.dir])
    assert rel.release.deltas, "the release carries a delta from 1.0.0"
    v21 = OsRelease("2.1.0", True, image, initrd, Path(vmlinuz), rel)
    rig.factory_install(v1)  # provision records slot a's sha256: the delta's source
    rig.publish(v21)

    with rig.slots_attached():
        result = rig.device().install()
        status = rig.device().status()
    assert (result.version, result.slot, result.kind, result.delta_from) == ("2.1.0", "b", "delta", "1.0.0"), result
    size = rel.release.image.size
    assert _sha256(rig.slot_bytes("b", size)) == _sha256(image.read_bytes())
    assert status["download"]["kind"] == "delta", status["download"]

    first = rig.boot(ONE_BOOT_TIMEOUT_S)
    _assert_booted(first, "2.1.0", "b", "abflip-2.1.0-b+2-1.conf")
    rig.set_booted_from(first)
    status = rig.device().mark_good()
    assert status["state"] == "committed" and status["floor"] == "2.1.0", status
