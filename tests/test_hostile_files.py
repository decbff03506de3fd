"""Issue 21 part 2: parsers that no input can crash. Every file abflip parses goes through
metadata.bounded (regular files only, opened without blocking, size bound before reading, JSON/TOML
nesting bound before parsing): each class of hostile file below is a clear error with its blame (or,
for what only informs, nothing at all), never a traceback, a hang or the machine's memory, and
nothing is flipped. Plus the two decoders agreeing, and the whole-image sha256 on the full path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from tuf.api.metadata import TargetFile

from abflip.demo import PRODUCT
from applier.agent import Device
from applier.release_control import RECORD
from builder.gc import collect_garbage
from builder.publish import commit, load_tagged, publish_release, target_key
from metadata import zstdlib
from metadata.bounded import MAX_JSON_DEPTH, loads_json, read_file
from metadata.delta import Delta, DeltaError
from metadata.errors import RepositoryError
from metadata.manifest import Channel, ManifestError, Release

from helpers import assert_untouched

REPO = Path(__file__).resolve().parents[1]
ABFLIP = [sys.executable, "-m", "abflip.cli"]
NESTED = b'{"schema": ' + b"[" * 5000 + b"]" * 5000 + b"}"  # 10 KB, 5,000 deep: Python recursed to death at ~1,000
NESTED_TOML = "[device]\nx = " + "[" * 5000 + "]" * 5000 + "\n"
DOTTED_TOML = "[device]\n" + ".".join(["a"] * 100000) + " = 1\n"  # tomllib: quadratic memory


def cli(sim, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*ABFLIP, *args, "--config", str(sim.config_path)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def no_traceback(p: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in p.stderr and "RecursionError" not in p.stderr, p.stderr


def sign_target(world, path: str, data: bytes) -> None:
    """The repository's keys sign ``data`` as target ``path``: what a compromised product key can do."""
    repo, tag = load_tagged(world.storage)
    t = TargetFile.from_data(path, data, ["sha256"])
    world.storage.put(target_key(t), data, content_type="application/json", cache_control="x")
    repo.add_target(t)
    assert commit(world.storage, world.keys, repo, tag)


# -- the reader itself -------------------------------------------------------------------------
def test_the_reader_refuses_special_and_huge_files_without_blocking_or_reading(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(3 << 30)  # sparse: refused by its size, never read
    for path, why in [(tmp_path / "fifo", "is a FIFO, not a regular file"),
                      (tmp_path, "is a directory, not a regular file"),
                      (Path("/dev/zero"), "is a character device, not a regular file"),
                      (huge, "is 3221225472 bytes, more than the limit 4096")]:
        with pytest.raises(OSError) as e:
            read_file(path, 4096)
        assert e.value.strerror == why
    with pytest.raises(FileNotFoundError):
        read_file(tmp_path / "missing", 10)
    (tmp_path / "ok").write_bytes(b"x" * 10)
    assert read_file(tmp_path / "ok", 10) == b"x" * 10
    with pytest.raises(ValueError, match=f"more than {MAX_JSON_DEPTH} deep"):
        loads_json(NESTED)
    assert loads_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is not None


# -- signed but hostile: a product key's nested pointer or manifest ------------------------------
def test_a_deeply_nested_signed_channel_pointer_is_a_repository_error_everywhere(world):
    world.publish("1.0.0")
    sim, dev = world.device()
    world.publish("2.0.0", channel="beta")
    sign_target(world, f"{PRODUCT}/channels/stable.json", NESTED)
    sign_target(world, "other-os/channels/stable.json", NESTED)  # another product's: verify and gc go on
    for op in (dev.check, dev.download, dev.install, lambda: dev.run(reboot=False)):
        with pytest.raises(RepositoryError, match=f"more than {MAX_JSON_DEPTH} deep"):
            op()
    assert_untouched(sim, dev)
    p = cli(sim, "check", "--json")
    assert p.returncode == 3 and json.loads(p.stdout)["error"]["blame"] == "repository", p.stdout
    no_traceback(p)
    p = subprocess.run([*ABFLIP, "repo", "verify", str(world.repo)], capture_output=True, text=True, timeout=120)
    no_traceback(p)
    assert p.returncode == 3 and f"{PRODUCT}/beta: 2.0.0  every device  ok" in p.stdout
    assert f"other-os/stable: FAIL: channel pointer is not valid JSON: it nests" in p.stdout
    gc = collect_garbage(world.storage, world.keys, keep=1, dry_run=True)
    assert {s["path"] for s in gc.skipped} >= {f"{PRODUCT}/channels/stable.json", "other-os/channels/stable.json"}
    base = ["--repo", str(world.repo), "--keys", str(world.keys.dir)]
    for args in (["channel", "promote", PRODUCT, "2.0.0", "--to", "stable", *base],
                 ["channel", "withdraw", PRODUCT, "1.0.0", "--channel", "stable", *base],
                 ["publish", str(world.built["3.0.0"]), "--to", str(world.repo), "--keys", str(world.keys.dir)]):
        p = subprocess.run([*ABFLIP, *args], capture_output=True, text=True, timeout=120)
        no_traceback(p)
        assert p.returncode in (2, 3) and "nests arrays or objects" in p.stderr, (args, p.stderr)


def test_a_deeply_nested_signed_release_or_delta_manifest_is_a_repository_error(world):
    world.publish("1.0.0")
    sim, dev = world.device()
    path = f"{PRODUCT}/releases/2.0.0/release.json"
    sign_target(world, path, NESTED)
    pointer = Channel(PRODUCT, "stable", Release.from_bytes((world.built["2.0.0"] / "release.json").read_bytes())
                      .version, path)
    sign_target(world, f"{PRODUCT}/channels/stable.json", pointer.to_bytes())
    with pytest.raises(ManifestError, match="release manifest is not valid JSON: it nests"):
        dev.install()
    assert_untouched(sim, dev)
    with pytest.raises(DeltaError, match="the delta manifest is not valid JSON: it nests") as e:
        Delta.from_bytes(NESTED)
    assert isinstance(e.value, RepositoryError)


# -- the device's own files ---------------------------------------------------------------------
def test_nested_or_special_state_records_never_stop_a_command_and_boot_check_blesses(world):
    """During a trial (the health unit runs boot-check), release-control.json, staged/download.json
    and state.json nested 50,000 deep or replaced by a FIFO: boot-check blesses and exits 0."""
    world.publish("1.0.0")
    sim, dev = world.device()
    world.publish("2.0.0")
    dev.install()
    assert sim.boot().slot == "b"
    (sim.state_dir / RECORD).write_bytes(NESTED)
    (sim.state_dir / "staged").mkdir(exist_ok=True)
    os.mkfifo(sim.state_dir / "staged" / "download.json.fifo")
    (sim.state_dir / "staged" / "download.json").write_bytes(NESTED)
    p = cli(sim, "status", "--json")
    no_traceback(p)
    assert p.returncode == 0 and json.loads(p.stdout)["state"] == "trial"
    p = cli(sim, "boot-check", "--json")
    no_traceback(p)
    assert p.returncode == 0 and json.loads(p.stdout)["booted_version"] == "2.0.0", p.stdout
    assert Device(sim.config).status()["state"] == "committed"
    for bad in (NESTED, None):  # nested, then a FIFO where state.json is
        path = sim.state_dir / "state.json"
        path.unlink()
        path.write_bytes(bad) if bad is not None else os.mkfifo(path)
        p = cli(sim, "status", "--json")
        no_traceback(p)
        st = json.loads(p.stdout)
        assert p.returncode == 0 and st["state_invalid"], st
        assert "nests" in st["state_invalid"] if bad is not None else "is a FIFO" in st["state_invalid"]
        p = cli(sim, "boot-check", "--json")
        assert p.returncode == 0, p.stderr
        no_traceback(p)


@pytest.mark.parametrize("text, why", [(NESTED_TOML, "nests arrays or tables more than 16 deep"),
                                       (DOTTED_TOML, "has a dotted key of more than 16 parts")])
def test_a_nested_or_dotted_config_is_a_user_error_for_every_command(world, text, why):
    sim, _ = world.device()
    sim.config_path.write_text(text)
    for cmd in ("status", "check", "boot-check", "install"):
        p = cli(sim, cmd, timeout=30)  # the dotted key used to take the machine's memory
        no_traceback(p)
        assert p.returncode == 2 and f"cannot read configuration {sim.config_path}: it {why}" in p.stderr, p.stderr


def test_a_fifo_device_id_file_only_keeps_the_device_out_of_partial_rollouts(world):
    world.publish("1.0.0")
    sim, dev = world.device()
    world.publish("2.0.0")
    os.mkfifo(sim.root / "machine-id")
    sim.config_path.write_text(sim.config_path.read_text().replace("[device]\n", '[device]\nid_file = "machine-id"\n'))
    for cmd in ("status", "check", "download", "boot-check", "mark-good"):
        p = cli(sim, cmd, "--json", timeout=60)
        no_traceback(p)
        assert p.returncode == 0, (cmd, p.stderr)
    p = cli(sim, "apply", "--now", "--json")
    assert p.returncode == 0, p.stderr  # no rollout on the channel: every device, id or not
    assert sim.boot().slot == "b"
    assert cli(sim, "boot-check").returncode == 0


# -- the producer's and the factory's inputs --------------------------------------------------------
def _special(kind: str, path: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(3 << 30)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        path.write_bytes(NESTED)


KINDS = {"fifo": "is a FIFO, not a regular file", "directory": "is a directory, not a regular file",
         "huge": "is 3221225472 bytes, more than the limit 8388608", "device": "is a character device",
         "nested": "nests arrays or objects more than 32 deep"}


@pytest.mark.parametrize("kind", KINDS)
def test_provision_delta_from_and_publish_refuse_a_release_json_that_is_no_file(world, tmp_path, kind):
    bad = tmp_path / "bad-release"
    bad.mkdir()
    for f in world.built["1.0.0"].iterdir():
        shutil.copy(f, bad / f.name)
    (bad / "release.json").unlink()
    _special(kind, bad / "release.json")
    sim, _ = world.device()
    p = cli(sim, "provision", str(bad), "--force", timeout=30)
    no_traceback(p)
    assert p.returncode == 2 and KINDS[kind] in p.stderr, p.stderr
    p = subprocess.run([*ABFLIP, "release", "create", "--image", str(world.built["2.0.0.img"]), "--product", PRODUCT,
                        "--version", "2.0.0", "--compatible", "x", "--kernel", str(world.built["2.0.0"] / "vmlinuz"),
                        "--delta-from", str(bad), "-o", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=60)
    no_traceback(p)
    assert p.returncode == 2 and "--delta-from" in p.stderr and KINDS[kind] in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()
    p = subprocess.run([*ABFLIP, "publish", str(bad), "--to", str(world.repo), "--keys", str(world.keys.dir)],
                       capture_output=True, text=True, timeout=60)
    no_traceback(p)
    assert p.returncode == 2 and KINDS[kind] in p.stderr, p.stderr


# -- the decoders, and the whole image -------------------------------------------------------
def _doctored(world, tmp_path: Path, version: str, *, extra: bytes = b"", image_sha256: str | None = None) -> Path:
    """``version``'s release signed as a hostile signer would: ``extra`` bytes after the last chunk's
    frame (its hashes and pieces signed to match), or another image sha256."""
    d = tmp_path / f"doctored-{version}"
    shutil.copytree(world.built[version], d)
    m = json.loads((d / "release.json").read_text())
    if extra:
        with open(d / "rootfs.img.zst", "ab") as f:
            f.write(extra)
        last = m["image"]["chunks"][-1]
        data = (d / "rootfs.img.zst").read_bytes()[last["offset"]:]
        piece = m["image"]["compression"]["piece_size"]
        last.update(length=len(data), sha256=hashlib.sha256(data).hexdigest(),
                    pieces=[hashlib.sha256(data[i:i + piece]).hexdigest() for i in range(0, len(data), piece)])
    if image_sha256:
        m["image"]["sha256"] = image_sha256
    (d / "release.json").write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
    return d


@pytest.mark.parametrize("decoder", ["libzstd", "python"])
@pytest.mark.parametrize("after", ["empty frame", "skippable frame"])
def test_a_signed_chunk_ending_in_another_frame_installs_with_neither_decoder(world, tmp_path, monkeypatch,
                                                                              decoder, after):
    if decoder == "python":
        monkeypatch.setattr(zstdlib, "LIB", None)
    elif zstdlib.LIB is None:
        pytest.fail("no libzstd on this machine (Debian's libzstd1)")
    extra = (zstandard.ZstdCompressor(write_content_size=True).compress(b"") if after == "empty frame"
             else (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc")
    world.publish("1.0.0")
    sim, dev = world.device()
    publish_release(_doctored(world, tmp_path, "2.0.0", extra=extra), world.storage, world.keys, channel="stable")
    with pytest.raises(RepositoryError, match=f"has {len(extra)} bytes after the end of its zstd frame"):
        dev.install()
    assert_untouched(sim, dev)
    assert dev.status()["slots"]["b"]["status"] != "good"


def test_a_manifest_whose_image_sha256_its_chunks_do_not_make_flips_nothing(world, tmp_path):
    world.publish("1.0.0")
    sim, dev = world.device()
    publish_release(_doctored(world, tmp_path, "2.0.0", image_sha256="ab" * 32), world.storage, world.keys,
                    channel="stable")
    for _ in range(2):  # and again: still the repository's fault, never the device's
        p = cli(sim, "install", "--json")
        no_traceback(p)
        assert p.returncode == 3, p.stdout
        err = json.loads(p.stdout.splitlines()[-1])["error"]
        assert err["blame"] == "repository" and "sha256 does not match the manifest" in err["message"]
        assert_untouched(sim, dev)
        st = dev.status()
        assert st["slots"]["b"]["status"] != "good" and st["slots"]["b"]["sha256"] != "ab" * 32
    world.publish("3.0.0")  # the publisher fixes it: the next release installs
    assert dev.install().version == "3.0.0"
