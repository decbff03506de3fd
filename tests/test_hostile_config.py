"""A careless or hostile device configuration (issue 9 items 5 and 6): every story ends in
``error (user|device): …`` with the documented exit code, no traceback, and nothing written —
above all, never a write over the booted slot, whatever the configuration says.

Where the story is about the command line, the real CLI runs in a subprocess; slot devices are
real files, symlinks, hard links, and real loop devices with real partitions."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from abflip.demo import HARDWARE, PRODUCT
from abflip.sim import SimDevice
from applier.config import DEFAULT_MEMORY, Config
from applier.slots import SlotDevice, device_identity, overlaps
from metadata.errors import DeviceError, UserError
from test_agent_config import BASE

REPO = Path(__file__).resolve().parents[1]



def abflip(*args, config, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "abflip.cli", *args, "--config", str(config)], capture_output=True,
                          text=True, cwd=cwd, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def load(tmp_path, text: str, base: str = BASE) -> Config:
    p = tmp_path / "abflip.toml"
    p.write_text(base + text)
    return Config.load(p)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256 (directories and links by kind): what 'nothing written' means."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def sim_device(root: Path, *, url="http://127.0.0.1:1/repo", trusted_root=b"{}", extra="") -> SimDevice:
    return SimDevice.create(root, repository_url=url, trusted_root=trusted_root, product=PRODUCT, hardware_id=HARDWARE,
                            slot_size=8 << 20, retries=1, timeout=5.0, extra=extra)


def assert_user_error(r, *texts, code=2, blame="user"):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith(f"error ({blame}): "), r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    for t in texts:
        assert t in r.stderr, (t, r.stderr)


def edit(config: Path, old: str, new: str) -> None:
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))


# --- item 6 over the CLI: paths of the wrong kind, typos, booleans ---------------------------------------------


@pytest.mark.parametrize("key, line", [("paths.esp", 'esp = "esp"'), ("paths.state_dir", 'state_dir = "state"')])
def test_a_directory_path_that_is_a_file_is_named(tmp_path, key, line):
    """A careless image build leaves a file where the ESP mount point or the state directory belongs:
    today NotADirectoryError; now the key, the path and the file are named, and nothing is written."""
    sim = sim_device(tmp_path / "dev")
    name = line.split('"')[1]
    shutil.rmtree(sim.root / name)
    (sim.root / name).write_text("not a directory\n")
    before = snapshot(sim.root)
    r = abflip("status", config=sim.config_path)
    assert_user_error(r, f"{sim.config_path}: {key} {sim.root / name} is a file, not a directory")
    r = abflip("install", config=sim.config_path)
    assert_user_error(r, key)
    assert snapshot(sim.root) == before


def test_a_configured_slot_that_is_a_directory_is_named(tmp_path):
    sim = sim_device(tmp_path / "dev")
    (sim.root / "slot-b.img").unlink()
    (sim.root / "slot-b.img").mkdir()
    before = snapshot(sim.root)
    r = abflip("install", config=sim.config_path)
    assert_user_error(r, "slots.b.device", "is a directory, not a block device or image file")
    assert snapshot(sim.root) == before


def test_misspelt_key_is_refused_with_the_nearest_name(tmp_path):
    """`chanel = "beta"` used to follow `stable` without a word."""
    sim = sim_device(tmp_path / "dev")
    edit(sim.config_path, 'channel = "stable"', 'chanel = "beta"')
    before = snapshot(sim.root)
    r = abflip("status", config=sim.config_path)
    assert_user_error(r, f"error (user): {sim.config_path}: device.chanel is not a known key; "
                         "did you mean device.channel?")
    assert snapshot(sim.root) == before


def test_misspelt_section_is_refused_with_the_nearest_name(tmp_path):
    sim = sim_device(tmp_path / "dev")
    edit(sim.config_path, "[network]", "[netwrok]")
    r = abflip("run", "--no-reboot", config=sim.config_path)
    assert_user_error(r, "[netwrok] is not a known section; did you mean [network]?")


@pytest.mark.parametrize("line, key", [("timeout = 5.0", "network.timeout"), ("retries = 1", "network.retries")])
def test_boolean_where_a_number_is_meant(tmp_path, line, key):
    sim = sim_device(tmp_path / "dev")
    edit(sim.config_path, line, line.split(" =")[0] + " = true")
    r = abflip("status", config=sim.config_path)
    assert_user_error(r, f"{key} must be", "not true")


def test_config_that_is_not_a_config_file(tmp_path):
    """A directory, non-UTF-8 bytes, /dev/zero and a FIFO given as --config: a clear error, no hang."""
    d = tmp_path / "abflip.toml"
    d.mkdir()
    assert_user_error(abflip("status", config=d), f"configuration {d} is a directory")
    latin = tmp_path / "latin1.toml"
    latin.write_bytes((BASE + 'channel = "b\xeata"\n').encode("latin-1").replace(b"[device]\n", b"[device]\n", 1))
    assert_user_error(abflip("status", config=latin), f"configuration {latin} is not UTF-8")
    assert_user_error(abflip("status", config="/dev/zero"), "/dev/zero is a character device, not a regular file")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    assert_user_error(abflip("status", config=fifo), "is a FIFO, not a regular file")
    big = tmp_path / "big.toml"
    big.write_text(BASE + "# " + "x" * (2 << 20) + "\n")
    assert_user_error(abflip("status", config=big), f"is {big.stat().st_size} bytes, more than the limit 1048576")


def test_relative_config_path_gives_absolute_paths(tmp_path):
    """`--config abflip.toml` from the device's directory: every path in it is made absolute at load,
    so nothing depends on the cwd later (hooks run in /, and get ABFLIP_CONFIG)."""
    sim = sim_device(tmp_path / "dev")
    r = abflip("status", "--json", config="abflip.toml", cwd=sim.root)
    assert r.returncode == 0, r.stderr
    assert '"esp": "' + str(sim.root / "esp") + '"' in r.stdout
    assert '"device": "' + str(sim.root / "slot-b.img") + '"' in r.stdout


# --- item 5 over the CLI: two slots, one device ------------------------------------------------------------------


def test_slot_b_symlink_to_slot_a_is_refused_at_load(tmp_path):
    sim = sim_device(tmp_path / "dev")
    (sim.root / "slot-a.img").write_bytes(b"booted system" * 1000)
    (sim.root / "slot-b.img").unlink()
    (sim.root / "slot-b.img").symlink_to("slot-a.img")
    before = snapshot(sim.root)
    r = abflip("install", config=sim.config_path)
    assert_user_error(r, "slots.a.device and slots.b.device name the same device")
    assert snapshot(sim.root) == before


def test_slot_b_hard_link_to_slot_a_is_refused_at_load(tmp_path):
    sim = sim_device(tmp_path / "dev")
    (sim.root / "slot-b.img").unlink()
    os.link(sim.root / "slot-a.img", sim.root / "b-is-really-a.img")
    edit(sim.config_path, 'device = "slot-b.img"', 'device = "b-is-really-a.img"')
    before = snapshot(sim.root)
    r = abflip("status", config=sim.config_path)
    assert_user_error(r, "slots.a.device and slots.b.device name the same device")
    assert snapshot(sim.root) == before


def discovered_slots(sim: SimDevice) -> Path:
    """Rewrite the sim's [slots] to discovery by partition label under <root>/by-partlabel."""
    edit(sim.config_path, 'a = { device = "slot-a.img", partlabel = "root-a" }\n'
                          'b = { device = "slot-b.img", partlabel = "root-b" }\n', "")
    edit(sim.config_path, "[paths]\n", '[paths]\npartlabels = "by-partlabel"\n')
    labels = sim.root / "by-partlabel"
    labels.mkdir()
    return labels


def test_discovered_slot_b_resolving_to_slot_a_install_refused_exit_5(world):
    """Two partitions labelled alike, or a udev link gone wrong: the configuration is fine, the device
    is not. install used to write over the booted slot and exit 0; now it is refused (exit 5)."""
    world.publish("1.0.0")
    world.publish("2.0.0")
    sim = sim_device(world.tmp / "dev", url=world.url,
                     trusted_root=(world.repo / "metadata" / "1.root.json").read_bytes())
    sim.provision(world.built["1.0.0.img"], slot="a", version="1.0.0", product=PRODUCT)
    labels = discovered_slots(sim)
    (labels / "root-a").symlink_to(sim.root / "slot-a.img")
    (labels / "root-b").symlink_to(sim.root / "slot-a.img")
    slot_a = hashlib.sha256((sim.root / "slot-a.img").read_bytes()).hexdigest()
    r = abflip("install", config=sim.config_path)
    assert_user_error(r, "refusing to write slot b", "booted slot a's device", code=5, blame="device")
    assert hashlib.sha256((sim.root / "slot-a.img").read_bytes()).hexdigest() == slot_a
    assert [e for e in sim.entries() if "-b" in e] == []


def test_discovered_slot_that_became_a_directory_is_a_device_error(world):
    world.publish("1.0.0")
    world.publish("2.0.0")
    sim = sim_device(world.tmp / "dev", url=world.url,
                     trusted_root=(world.repo / "metadata" / "1.root.json").read_bytes())
    sim.provision(world.built["1.0.0.img"], slot="a", version="1.0.0", product=PRODUCT)
    labels = discovered_slots(sim)
    (labels / "root-a").symlink_to(sim.root / "slot-a.img")
    (labels / "root-b").mkdir()
    r = abflip("install", config=sim.config_path)
    assert_user_error(r, f"slot b device {labels / 'root-b'} is a directory, not a block device or image file",
                      code=5, blame="device")
    assert [e for e in sim.entries() if "-b" in e] == []


# --- item 6 through Config.load: every key typed and bounded -------------------------------------------------------


# the keys that took a boolean as 1 (the others already refused one; the new ones must too)
NUMERIC = ["network.timeout", "network.retries", "network.low_speed_time", "network.low_speed_limit", "limits.memory"]


@pytest.mark.parametrize("key", NUMERIC)
@pytest.mark.parametrize("value", ["true", "false"])
def test_booleans_are_not_numbers_anywhere(tmp_path, key, value):
    section, name = key.split(".")
    with pytest.raises(UserError) as e:
        load(tmp_path, f"[{section}]\n{name} = {value}\n")
    assert f"{tmp_path / 'abflip.toml'}: {key} " in e.value.message and f"not {value}" in e.value.message


@pytest.mark.parametrize("text, key", [
    ('[network]\nbandwidth_limit = "99999999999G"\n', "network.bandwidth_limit"),
    ("[network]\nlow_speed_limit = 9223372036854775807\n", "network.low_speed_limit"),
    ("[network]\nlow_speed_time = 0\n", "network.low_speed_time"),
    ("[network]\nlow_speed_time = 86400\n", "network.low_speed_time"),
    ("[limits]\nmemory = 1048576\n", "limits.memory"),
    ('[limits]\nmemory = "8M"\n', "limits.memory"),
    ('[limits]\nmemory = "lots"\n', "limits.memory"),
    ('[limits]\nmemory = "2M/s"\n', "limits.memory"),
    ("[limits]\nmemory = 9223372036854775807\n", "limits.memory"),
])
def test_huge_and_out_of_range_numbers(tmp_path, text, key):
    with pytest.raises(UserError) as e:
        load(tmp_path, text)
    assert key in e.value.message and len(e.value.message) < 300


@pytest.mark.parametrize("text, key", [
    ('[maintenance]\nreboot_command = ["re\\u0000boot"]\n', "maintenance.reboot_command"),
    ('[maintenance]\nreboot_command = "reboot \'now"\n', "maintenance.reboot_command"),
    ('[slots]\nb = { partlabel = "' + "x" * 37 + '" }\n', "slots.b.partlabel"),
    ('[slots]\nc = { partlabel = "root-c" }\n', "slots.c"),
])
def test_wrong_types_everywhere(tmp_path, text, key):
    with pytest.raises(UserError) as e:
        load(tmp_path, text)
    assert key in e.value.message


@pytest.mark.parametrize("text, key", [
    ('[paths]\nstate_dir = " "\n', "paths.state_dir"),
    ('[paths]\nesp = "  "\n', "paths.esp"),
    ('[paths]\ncmdline = "\\t"\n', "paths.cmdline"),
    ('[hooks]\ndir = " "\n', "hooks.dir"),
    ('[slots]\na = { device = " " }\n', "slots.a.device"),
    ('[slots]\na = { partlabel = " " }\n', "slots.a.partlabel"),
])
def test_blank_strings(tmp_path, text, key):
    """A blank value used to become a path named ' ' beside the configuration file."""
    with pytest.raises(UserError) as e:
        load(tmp_path, text)
    assert key in e.value.message and "non-empty string" in e.value.message


@pytest.mark.parametrize("url", ["http://", "http:///repo", "http://host/re po", "https://host/\nrepo"])
def test_repository_url_must_be_a_url(tmp_path, url):
    (tmp_path / "abflip.toml").write_text(f'[repository]\nurl = """{url}"""\ntrusted_root = "r"\n[device]\nproduct = "p"\n')
    with pytest.raises(UserError, match="repository.url"):
        Config.load(tmp_path / "abflip.toml")


@pytest.mark.parametrize("text, message", [
    ('chanel = "beta"\n', "chanel is not a known key; did you mean device.channel?"),
    ("timeout = 5\n", "timeout is not a known key; did you mean network.timeout?"),
    ("[network]\ntries = 5\n", "network.tries is not a known key; did you mean network.retries?"),
    ("[boot]\nretries = 5\n", "boot.retries is not a known key; did you mean boot.tries?"),
    ("[hooks]\ndirs = 'h'\n", "hooks.dirs is not a known key; did you mean hooks.dir?"),
    ("[limit]\nmemory = '64M'\n", "[limit] is not a known section; did you mean [limits]?"),
    ("[network]\nmemory = '64M'\n", "network.memory is not a known key; did you mean limits.memory?"),
    ('[slots]\na = { devcie = "/dev/sda2" }\n', "slots.a.devcie is not a known key; did you mean slots.a.device?"),
    ("[telemetry]\nenabled = true\n", "[telemetry] is not a known section"),
])
def test_unknown_keys_and_sections_name_the_nearest(tmp_path, text, message):
    p = tmp_path / "abflip.toml"
    p.write_text(text + BASE if not text.startswith("[") else BASE + text)
    with pytest.raises(UserError) as e:
        Config.load(p)
    assert e.value.message == f"{p}: {message}"


def test_a_file_path_that_is_a_directory_and_vice_versa(tmp_path):
    (tmp_path / "root.json").mkdir()
    with pytest.raises(UserError, match=r"repository.trusted_root .*root.json is a directory, not a file"):
        load(tmp_path, "")
    (tmp_path / "root.json").rmdir()
    (tmp_path / "root.json").write_text("{}")
    for key in ("efivars", "dmi", "partlabels"):
        with pytest.raises(UserError, match=rf"paths.{key} .* is a file, not a directory"):
            load(tmp_path, f'[paths]\n{key} = "root.json"\n')
    with pytest.raises(UserError, match=r"paths.cmdline .* is a directory, not a file"):
        load(tmp_path, '[paths]\ncmdline = "."\n')
    with pytest.raises(UserError, match=r"hooks.dir .* is a file, not a directory"):
        load(tmp_path, '[hooks]\ndir = "root.json"\n')
    with pytest.raises(UserError, match=r"slots.a.device .* is not a block device or image file"):
        load(tmp_path, '[slots]\na = { device = "/dev/null" }\n')
    long = "x" * 5000
    with pytest.raises(UserError) as e:
        load(tmp_path, f'[paths]\nstate_dir = "{long}"\n')
    assert "paths.state_dir" in e.value.message and "too long" in e.value.message.lower()


def test_new_keys_and_their_defaults(tmp_path):
    cfg = load(tmp_path, "")
    assert (cfg.low_speed_limit, cfg.low_speed_time, cfg.memory_budget) == (1024, 60.0, 256 << 20) == \
        (1024, 60.0, DEFAULT_MEMORY)
    cfg = load(tmp_path, '[network]\nlow_speed_limit = "4K"\nlow_speed_time = 15\n[limits]\nmemory = "64M"\n')
    assert (cfg.low_speed_limit, cfg.low_speed_time, cfg.memory_budget) == (4096, 15.0, 64 << 20)
    cfg = load(tmp_path, "[network]\nlow_speed_limit = 0\n[limits]\nmemory = 16777216\n")
    assert (cfg.low_speed_limit, cfg.memory_budget) == (0, 16 << 20)


# --- item 5 below the CLI: identity and overlap on files, links and real loop devices ------------------------------


def test_identity_of_files_symlinks_and_hard_links(tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(b"a" * 4096)
    b.write_bytes(b"b" * 4096)
    (tmp_path / "link").symlink_to(a)
    os.link(a, tmp_path / "hard")
    assert device_identity(tmp_path / "link") == device_identity(a) == device_identity(tmp_path / "hard")
    assert overlaps(a, tmp_path / "link") and overlaps(tmp_path / "hard", a) and overlaps(a, a)
    assert not overlaps(a, b)
    with pytest.raises(OSError):
        overlaps(a, tmp_path / "missing")


def test_slot_device_refuses_to_write_the_booted_slot(tmp_path):
    a, b = tmp_path / "slot-a.img", tmp_path / "slot-b.img"
    a.write_bytes(b"booted" * 1000)
    b.write_bytes(b"\0" * 6000)
    (tmp_path / "b-link").symlink_to(a)
    before = a.read_bytes()
    with pytest.raises(DeviceError, match=r"refusing to write slot b: its device .*b-link is the booted slot a's device"):
        SlotDevice("b", tmp_path / "b-link", write=True, booted=a)
    with SlotDevice("b", b, write=True, booted=a) as dev:  # the other slot: fine
        dev.pwrite(0, b"new")
    with SlotDevice("a", tmp_path / "b-link", write=False, booted=a) as dev:  # reading is always allowed
        assert dev.pread(0, 6) == b"booted"
    assert a.read_bytes() == before


def test_slot_device_that_is_a_directory_or_not_a_device(tmp_path):
    (tmp_path / "slot").mkdir()
    for write in (False, True):
        with pytest.raises(DeviceError, match=r"slot b device .*slot is a directory, not a block device or image file"):
            SlotDevice("b", tmp_path / "slot", write=write)
    with pytest.raises(DeviceError, match="is neither, not a block device or image file"):
        SlotDevice("b", "/dev/null", write=False)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DeviceError, match="not a block device"):  # and no hang in open()
        SlotDevice("b", fifo, write=False)


def _root_with_loop() -> bool:
    return os.geteuid() == 0 and shutil.which("losetup") is not None and shutil.which("sfdisk") is not None


@pytest.fixture
def loop_disk(tmp_path):
    """A real loop device over a GPT image with two 4 MiB partitions: (disk, part1, part2, image)."""
    if not _root_with_loop():
        pytest.skip("needs root, losetup and sfdisk")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["sfdisk", "-q", str(image)], input="label: gpt\n,4M\n,4M\n", text=True, check=True)
    r = subprocess.run(["losetup", "-fP", "--show", str(image)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    disk = Path(r.stdout.strip())
    try:
        parts = []
        for n in (1, 2):
            sysdir = Path("/sys/block") / disk.name / f"{disk.name}p{n}"
            for i in range(100):  # the kernel adds partitions asynchronously (or, in some containers, not at all)
                if (sysdir / "dev").exists():
                    break
                if i == 10:
                    subprocess.run(["partx", "-a", str(disk)], capture_output=True, check=False)
                time.sleep(0.1)
            else:
                pytest.skip(f"the kernel shows no partitions of {disk}")
            major, minor = (int(x) for x in (sysdir / "dev").read_text().split(":"))
            node = tmp_path / f"{disk.name}p{n}"  # our own node: /dev may have no udev
            os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
            parts.append(node)
        yield disk, parts[0], parts[1], image
    finally:
        subprocess.run(["losetup", "-d", str(disk)], check=False)


def test_loop_disk_and_its_partitions(loop_disk, tmp_path):
    disk, p1, p2, image = loop_disk
    assert overlaps(disk, p1) and overlaps(p2, disk)  # a disk and its partition
    assert not overlaps(p1, p2)  # the two partitions of an A/B layout are apart
    assert overlaps(image, disk) and overlaps(p1, image)  # the loop device is stored in the image file
    other = tmp_path / "p1-again"  # another device node of the same partition
    st = os.stat(p1)
    os.mknod(other, 0o600 | stat.S_IFBLK, st.st_rdev)
    assert overlaps(other, p1) and not overlaps(other, p2)


def test_loop_partition_write_refused_when_the_booted_slot_is_its_disk(loop_disk):
    disk, p1, p2, _image = loop_disk
    with pytest.raises(DeviceError, match="refusing to write slot b"):
        SlotDevice("b", p1, write=True, booted=disk)
    with SlotDevice("b", p2, write=True, booted=p1) as dev:  # the real A/B case: allowed
        assert dev.capacity == 4 << 20
        dev.pwrite(0, b"slot b")


def test_loop_partition_and_disk_as_slots_refused_at_load(loop_disk, tmp_path):
    disk, p1, p2, _image = loop_disk
    with pytest.raises(UserError, match="slots.a.device and slots.b.device name the same device"):
        load(tmp_path, f'[slots]\na = {{ device = "{disk}" }}\nb = {{ device = "{p2}" }}\n')
    cfg = load(tmp_path, f'[slots]\na = {{ device = "{p1}" }}\nb = {{ device = "{p2}" }}\n')
    assert cfg.slots["b"].device == p2


def test_a_block_device_in_use_is_not_written(loop_disk):
    """O_EXCL, as mkfs: a mounted or otherwise claimed partition is refused."""
    _disk, _p1, p2, _image = loop_disk
    holder = os.open(p2, os.O_RDONLY | os.O_EXCL)
    try:
        with pytest.raises(DeviceError, match="is in use"):
            SlotDevice("b", p2, write=True)
    finally:
        os.close(holder)
    SlotDevice("b", p2, write=True).close()


def test_symlink_swapped_during_open_never_opens_the_booted_slot(tmp_path):
    """A link flipping between slot b and slot a while the agent opens it (a racing udev rule, or an
    attacker): the descriptor is checked after the open, so slot a is never opened for writing."""
    import threading

    a, b = tmp_path / "slot-a.img", tmp_path / "slot-b.img"
    a.write_bytes(b"booted" * 1000)
    b.write_bytes(b"\0" * 6000)
    link, tmp_link_a, tmp_link_b = tmp_path / "root-b", tmp_path / ".to-a", tmp_path / ".to-b"
    link.symlink_to(b)
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            for target, tmp in ((a, tmp_link_a), (b, tmp_link_b)):
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(target)
                os.replace(tmp, link)

    t = threading.Thread(target=flip)
    t.start()
    opened, refused = 0, 0
    try:
        for _ in range(3000):
            try:
                dev = SlotDevice("b", link, write=True, booted=a)
            except DeviceError as e:
                assert "refusing to write slot b" in e.message or "does not exist" in e.message
                refused += 1
                continue
            with dev:
                assert os.fstat(dev.fd).st_ino == os.stat(b).st_ino  # never slot a
                opened += 1
    finally:
        stop.set()
        t.join()
    assert opened and refused and a.read_bytes() == b"booted" * 1000
