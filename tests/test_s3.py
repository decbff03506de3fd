"""Publishing to S3: real S3 servers (moto_server and SeaweedFS on 127.0.0.1) over HTTP, devices
fetching the bucket's public objects over HTTP. Publishing stories run against a directory and
both stores; the S3-only ones against both stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from abflip.demo import PRODUCT
from builder.errors import AlreadyExists, StorageAccessError, StorageError
from builder.publish import fresh_for, headers_for, publish_release
from builder.storage.s3 import S3Storage
from metadata.errors import UserError
from metadata.keys import KeyConfig
from metadata.repository import Repository

from seaweedfs import SeaweedFS
from s3server import DUMMY_ENV, MotoServer, S3World, backend, dummy_credentials, moto, s3, seaweedfs  # noqa: F401

ABFLIP = [sys.executable, "-m", "abflip.cli"]


def _load(storage) -> Repository:
    return Repository.load(lambda n: storage.get(f"metadata/{n}"))


def test_device_installs_from_either_backend(backend):
    backend.publish("1.0.0")
    backend.publish("2.0.0")
    sim, dev = backend.device()
    assert dev.install().version == "2.0.0"
    assert sim.boot().slot == "b"


def test_republish_is_a_noop_on_either_backend(backend):
    first = backend.publish("2.0.0")
    again = backend.publish("2.0.0")
    assert first.changed and not again.changed
    assert again.timestamp_version == first.timestamp_version


def test_create_only_and_compare_and_swap_on_either_backend(backend):
    st = backend.storage
    st.put("metadata/99.targets.json", b"a", content_type="application/json", cache_control="x", create_only=True)
    with pytest.raises(AlreadyExists):
        st.put("metadata/99.targets.json", b"b", content_type="application/json", cache_control="x", create_only=True)
    assert st.get("metadata/99.targets.json") == b"a"
    _, tag = st.get_tagged("metadata/timestamp.json")
    data, _ = st.get_tagged("metadata/timestamp.json")
    st.put("metadata/timestamp.json", data, content_type="application/json", cache_control="no-store", if_match=tag)
    _, new_tag = st.get_tagged("metadata/timestamp.json")
    st.put("metadata/timestamp.json", data + b" ", content_type="application/json", cache_control="no-store",
           if_match=new_tag)
    with pytest.raises(AlreadyExists):  # the tag we hold is stale: someone replaced the object
        st.put("metadata/timestamp.json", data, content_type="application/json", cache_control="no-store",
               if_match=new_tag)


def race(n: int, write) -> list[int]:
    """Run ``write(i)`` in ``n`` threads released at once; the indices whose write won."""
    import threading

    won: list[int] = []
    start = threading.Barrier(n)

    def one(i: int) -> None:
        start.wait()
        try:
            write(i)
            won.append(i)
        except AlreadyExists:
            pass

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


def test_conditional_writes_have_one_winner_under_concurrency(s3):
    """Eight publishers at once, five rounds: one create-only write of a key wins, one
    compare-and-swap from the same tag wins; every loser gets AlreadyExists (as publish expects)."""
    st = S3Storage.from_url(f"s3://{s3.new_bucket()}/r", endpoint_url=s3.endpoint, region="us-east-1",
                            max_concurrency=8)
    kw = {"content_type": "application/json", "cache_control": "no-store"}
    for round_ in range(5):
        key = f"metadata/{round_}.snapshot.json"
        won = race(8, lambda i: st.put(key, f"create {i}".encode(), create_only=True, **kw))
        assert len(won) == 1, won
        assert st.get(key) == f"create {won[0]}".encode()
        _, tag = st.get_tagged(key)
        won = race(8, lambda i: st.put(key, f"swap {i}".encode(), if_match=tag, **kw))
        assert len(won) == 1, won
        assert st.get(key) == f"swap {won[0]}".encode()


def test_s3_objects_carry_headers(s3, tmp_path, built):
    w = S3World(tmp_path, built, s3)
    w.publish("1.0.0")
    keys = w.storage.list("")
    assert any(k.startswith("targets/demo-os/releases/1.0.0/") and k.endswith(".rootfs.img.zst") for k in keys)
    for key in keys:
        h = w.storage.head(key)
        ctype, cache = headers_for(key)
        assert h["cache_control"] == cache, key
        if ctype == "application/octet-stream" and isinstance(s3, SeaweedFS):
            # SeaweedFS takes octet-stream for "unknown" and guesses from the name (initrd.img:
            # application/x-raw-disk-image); devices never read Content-Type (docs/producer.md)
            assert h["content_type"] in (ctype, "application/x-raw-disk-image"), key
        else:
            assert h["content_type"] == ctype, key
        assert not h["content_encoding"]
    assert w.storage.head("metadata/timestamp.json")["cache_control"] == fresh_for()
    # and over plain HTTP, as a device or CDN sees them
    import urllib.request

    with urllib.request.urlopen(f"{w.url}/metadata/timestamp.json") as r:
        assert r.headers["Cache-Control"] == fresh_for()
        assert r.headers["ETag"] and r.headers["Last-Modified"]  # what a cache revalidates with


def test_multipart_upload_of_a_large_file(s3, tmp_path):
    bucket = s3.new_bucket()
    st = S3Storage.from_url(f"s3://{bucket}/p", endpoint_url=s3.endpoint, region="us-east-1",
                            part_size=5 << 20, max_concurrency=4)
    big = tmp_path / "big.zst"
    big.write_bytes(os.urandom(11 << 20) + b"end")
    seen = []
    st.put_file("targets/x/big.zst", big, content_type="application/zstd", cache_control="immutable",
                progress=seen.append)
    h = st.head("targets/x/big.zst")
    assert h["length"] == big.stat().st_size
    assert h["etag"].strip('"').endswith("-3")  # three parts
    assert h["content_type"] == "application/zstd"
    assert sum(seen) == big.stat().st_size
    assert st.get("targets/x/big.zst") == big.read_bytes()


def test_missing_bucket_is_a_user_error(s3, tmp_path, built):
    st = S3Storage.from_url("s3://no-such-bucket-abflip/repo", endpoint_url=s3.endpoint, region="us-east-1")
    with pytest.raises(StorageAccessError, match="does not exist") as e:
        st.get("metadata/1.root.json")
    assert "create the bucket" in e.value.hint
    r = subprocess.run([*ABFLIP, "repo", "init", "--keys", str(tmp_path / "k"), "--to", "s3://no-such-bucket-abflip/r"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, **DUMMY_ENV, AWS_ENDPOINT_URL_S3=s3.endpoint))
    assert r.returncode == 2 and r.stderr.startswith("error (user): ") and "does not exist" in r.stderr, r.stderr


def test_access_denied_is_a_user_error(tmp_path):
    """moto in IAM auth mode (INITIAL_NO_AUTH_ACTION_COUNT=0) rejects credentials it does not know."""
    server = MotoServer(env={**DUMMY_ENV, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        st = S3Storage.from_url("s3://some-bucket/repo", endpoint_url=server.endpoint, region="us-east-1")
        with pytest.raises(StorageAccessError, match="access denied") as e:
            st.put("metadata/x.json", b"{}", content_type="application/json", cache_control="no-store")
        assert "credentials" in e.value.hint and e.value.exit_code == 2
    finally:
        server.stop()


def test_seaweedfs_refuses_unknown_credentials_and_anonymous_writes(seaweedfs, monkeypatch):
    """SeaweedFS with identities (tests/seaweedfs.py): a key it does not know is access denied; an
    anonymous reader (a device, a CDN) reads but can neither write nor delete."""
    import urllib.error
    import urllib.request

    bucket = seaweedfs.new_bucket()
    seaweedfs.client().put_object(Bucket=bucket, Key="metadata/timestamp.json", Body=b"{}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-known-key")
    st = S3Storage.from_url(f"s3://{bucket}/", endpoint_url=seaweedfs.endpoint, region="us-east-1")
    with pytest.raises(StorageAccessError, match="access denied") as e:  # a user error (exit 2)
        st.put("metadata/x.json", b"{}", content_type="application/json", cache_control="no-store")
    assert "credentials" in e.value.hint
    url = f"{seaweedfs.endpoint}/{bucket}/metadata/timestamp.json"
    with urllib.request.urlopen(url) as r:
        assert r.read() == b"{}"
    for method in ("PUT", "DELETE"):
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.urlopen(urllib.request.Request(url, data=b"[]" if method == "PUT" else None, method=method))
        assert http.value.code == 403, method
    assert seaweedfs.client().get_object(Bucket=bucket, Key="metadata/timestamp.json")["Body"].read() == b"{}"


def test_unknown_profile_is_a_user_error():
    with pytest.raises(UserError, match="profile"):
        S3Storage.from_url("s3://b/p", profile="abflip-no-such-profile")


def test_interrupted_upload_leaves_previous_state(s3, tmp_path, built):
    """The image upload dies mid-way (the connection's callback raises after the first part):
    nothing new is visible, the device still sees 1.0.0; a retry completes the publish."""
    w = S3World(tmp_path, built, s3)
    w.publish("1.0.0")
    before = w.storage.get("metadata/timestamp.json")
    st = S3Storage.from_url(w.s3_url, endpoint_url=s3.endpoint, region="us-east-1", part_size=5 << 20)

    class Cut(Exception):
        pass

    class Interrupted(S3Storage):  # a storage whose network dies during the image upload
        def put_file(self, key, path, **kw):
            def cut(n):
                raise Cut("connection lost")
            return super().put_file(key, path, progress=cut, **{k: v for k, v in kw.items() if k != "progress"})

    broken = Interrupted(st.client, st.bucket, st.prefix, transfer=st.transfer)
    with pytest.raises((Cut, StorageError)):
        publish_release(built["2.0.0"], broken, w.keys, channel="stable")
    assert w.storage.get("metadata/timestamp.json") == before
    left = [k for k in w.storage.list("targets/") if "2.0.0" in k]
    assert not any(k.endswith(".rootfs.img.zst") for k in left), left  # the aborted upload left no object
    sim, dev = w.device()
    with pytest.raises(Exception, match="not newer"):
        dev.install()
    assert publish_release(built["2.0.0"], w.storage, w.keys, channel="stable").changed
    assert dev.install().version == "2.0.0"


def test_failure_before_timestamp_leaves_previous_state(backend):
    """Targets and targets metadata are up, the snapshot write fails: devices see the old state."""
    backend.publish("1.0.0")
    before = backend.storage.get("metadata/timestamp.json")
    real = backend.storage

    class FailSnapshot:
        def __getattr__(self, name):
            return getattr(real, name)

        def put(self, key, data, **kw):
            if key.endswith(".snapshot.json"):
                raise StorageError("network gone")
            return real.put(key, data, **kw)

    with pytest.raises(StorageError):
        publish_release(backend.built["2.0.0"], FailSnapshot(), backend.keys, channel="stable")
    assert backend.storage.get("metadata/timestamp.json") == before
    sim, dev = backend.device()
    with pytest.raises(Exception, match="not newer"):
        dev.install()
    backend.publish("2.0.0")
    assert dev.install().version == "2.0.0"


def test_cli_publish_to_s3_and_concurrent_publishers(s3, tmp_path, built):
    """repo init and two concurrent `abflip publish` processes (different versions and channels)
    against one bucket; both land, and devices on each channel see their release."""
    server = s3
    bucket = server.new_bucket()
    url = f"s3://{bucket}/repo"
    env = dict(os.environ, **DUMMY_ENV)
    s3 = ["--endpoint-url", server.endpoint, "--region", "us-east-1"]
    r = subprocess.run([*ABFLIP, "repo", "init", "--keys", str(tmp_path / "keys"), "--to", url],
                       capture_output=True, text=True, timeout=60, env=dict(env, AWS_ENDPOINT_URL_S3=server.endpoint))
    assert r.returncode == 0, r.stderr
    first = subprocess.run([*ABFLIP, "publish", str(built["1.0.0"]), "--to", url, "--keys", str(tmp_path / "keys"),
                            *s3, "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert first.returncode == 0, first.stderr
    procs = [subprocess.Popen([*ABFLIP, "publish", str(built[v]), "--to", url, "--keys", str(tmp_path / "keys"),
                               "--channel", ch, *s3, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
             for v, ch in (("2.0.0", "stable"), ("3.0.0", "beta"))]
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        assert json.loads(out)["changed"] is True
    st = S3Storage.from_url(url, endpoint_url=server.endpoint, region="us-east-1")
    repo = _load(st)
    assert repo.is_current
    assert {"demo-os/channels/stable.json", "demo-os/channels/beta.json", "demo-os/releases/2.0.0/release.json",
            "demo-os/releases/3.0.0/release.json"} <= set(repo.target_files)
    from s3server import make_device

    http = f"{server.endpoint}/{bucket}/repo"
    root = st.get("metadata/1.root.json")
    _, stable = make_device(tmp_path / "stable-dev", http, root, built)
    _, beta = make_device(tmp_path / "beta-dev", http, root, built, channel="beta")
    assert stable.install().version == "2.0.0"
    assert beta.install().version == "3.0.0"


def test_publish_with_a_key_root_does_not_trust_fails_cleanly(backend, tmp_path):
    """A targets key that root does not (or no longer) trust: nothing is signed or uploaded."""
    from securesystemslib.signer import CryptoSigner

    backend.publish("1.0.0")
    keys = KeyConfig.load(backend.keys.dir)
    signer = CryptoSigner.generate_ed25519()
    pem = backend.keys.dir / "rogue.pem"
    pem.write_bytes(signer.private_bytes)
    keys.roles["targets"] = [type(keys.roles["targets"][0])(signer.public_key.keyid, f"file2:{pem}")]
    before = backend.storage.get("metadata/timestamp.json")
    with pytest.raises(UserError, match="targets"):
        publish_release(backend.built["2.0.0"], backend.storage, keys, channel="stable")
    assert backend.storage.get("metadata/timestamp.json") == before


def test_publish_with_a_missing_key_file_is_a_user_error(backend):
    backend.publish("1.0.0")
    keys = KeyConfig.load(backend.keys.dir)
    (backend.keys.dir / "targets.pem").rename(backend.keys.dir / "targets.pem.gone")
    try:
        before = backend.storage.get("metadata/timestamp.json")
        with pytest.raises(UserError, match="cannot load signing key"):
            publish_release(backend.built["2.0.0"], backend.storage, keys, channel="stable")
        assert backend.storage.get("metadata/timestamp.json") == before
    finally:
        (backend.keys.dir / "targets.pem.gone").rename(backend.keys.dir / "targets.pem")


def test_device_side_and_local_publishing_need_no_boto3(tmp_path):
    code = ("import sys; sys.modules['boto3'] = None; sys.modules['botocore'] = None\n"
            "import applier.agent, applier.client, abflip.cli, builder.publish\n"
            "from builder.storage import open_storage; open_storage(sys.argv[1])\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_ci_release_script_publishes_to_s3(moto, tmp_path, built):
    """ci/release.sh with the repository in a bucket (S3 options from ABFLIP_* variables),
    from a tarball, as squashfs, with a deep audit at the end; a device installs it over HTTP."""
    from abflip.demo import make_rootfs
    from s3server import make_device

    bucket = moto.new_bucket()
    url = f"s3://{bucket}/edge"
    env = dict(os.environ, **DUMMY_ENV, ABFLIP_ENDPOINT_URL=moto.endpoint, ABFLIP_REGION="us-east-1")
    r = subprocess.run([*ABFLIP, "repo", "init", "--keys", str(tmp_path / "keys"), "--to", url], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    tree = make_rootfs(tmp_path / "tree", "5.0.0", size=100_000)
    subprocess.run(["tar", "-C", str(tree), "--zstd", "-cf", str(tmp_path / "rootfs.tar.zst"), "."], check=True)
    script = Path(__file__).resolve().parents[1] / "ci" / "release.sh"
    env.update(ABFLIP_PRODUCT="demo-os", ABFLIP_COMPATIBLE="demo-board", ABFLIP_REPO=url, ABFLIP_KEYS=str(tmp_path / "keys"),
               ABFLIP_KERNEL=str(built["1.0.0"] / "vmlinuz"), ABFLIP_FSTYPE="squashfs", ABFLIP_VERIFY="deep",
               SOURCE_DATE_EPOCH="7", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", str(script), str(tmp_path / "rootfs.tar.zst"), "5.0.0"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo-os/stable: 5.0.0  every device  ok" in r.stdout
    root = S3Storage.from_url(url, endpoint_url=moto.endpoint).get("metadata/1.root.json")
    _, dev = make_device(tmp_path / "dev", f"{moto.endpoint}/{bucket}/edge", root, built)
    assert dev.install().version == "5.0.0"


def test_interrupted_multipart_upload_is_aborted(s3, tmp_path, built):
    """A 20 MiB image goes up in 8 MiB parts; the transfer dies after the first part. boto3
    aborts the multipart upload: no object, no dangling parts, the timestamp is untouched."""
    from builder.release import create_release

    w = S3World(tmp_path, built, s3)
    w.publish("1.0.0")
    before = w.storage.get("metadata/timestamp.json")
    img = tmp_path / "big.img"
    img.write_bytes(os.urandom(20 << 20))
    create_release(img, tmp_path / "rel", product="demo-os", version="4.0.0", compatible=["demo-board"],
                   kernel=built["1.0.0"] / "vmlinuz", level=1, chunk_size=4 << 20, window=0)
    assert (tmp_path / "rel" / "rootfs.img.zst").stat().st_size > 16 << 20  # over the multipart threshold

    class Cut(Exception):
        pass

    class DiesAfterOnePart(S3Storage):
        def put_file(self, key, path, **kw):
            sent = [0]

            def count(n):
                sent[0] += n
                if key.endswith(".zst") and sent[0] > 9 << 20:
                    raise Cut("connection lost")
            return super().put_file(key, path, progress=count, **{k: v for k, v in kw.items() if k != "progress"})

    st = w.storage
    broken = DiesAfterOnePart(st.client, st.bucket, st.prefix, transfer=st.transfer)
    with pytest.raises((Cut, StorageError)):
        publish_release(tmp_path / "rel", broken, w.keys, channel="stable")
    assert w.storage.get("metadata/timestamp.json") == before
    assert not any(k.endswith(".rootfs.img.zst") and "4.0.0" in k for k in w.storage.list("targets/"))
    assert not st.client.list_multipart_uploads(Bucket=st.bucket).get("Uploads")
    assert publish_release(tmp_path / "rel", w.storage, w.keys, channel="stable").changed  # the retry completes


# -- issue 23: every s3:// command takes the S3 options; errors blame what is wrong -------------
def _no_abflip_env() -> dict:
    """This environment without ABFLIP_* S3 settings or AWS_ENDPOINT_URL*: only the options count."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("ABFLIP_", "AWS_ENDPOINT_URL"))} | DUMMY_ENV


def _s3cli(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*ABFLIP, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env or _no_abflip_env())


def test_every_s3_command_takes_the_s3_options(moto, tmp_path, built):
    """The key ceremony, a publish, the signer, verify and gc against a bucket, each with
    --endpoint-url/--region and nothing from the environment but credentials."""
    bucket = moto.new_bucket()
    url = f"s3://{bucket}/repo"
    s3 = ["--endpoint-url", moto.endpoint, "--region", "us-east-1"]
    keys = tmp_path / "keys"
    steps = [
        ["repo", "init", "--keys", keys, "--to", url, *s3],
        ["repo", "status", "--repo", url, "--keys", keys, *s3],
        ["repo", "delegate", PRODUCT, "--keys", keys, "--to", url, "--generate", *s3],
        ["repo", "commit", "--keys", keys, "--to", url, *s3],
        ["repo", "rotate", "timestamp", "--keys", keys, "--to", url, "--generate", "1", *s3],
        ["repo", "commit", "--keys", keys, "--to", url, *s3],
        ["publish", built["1.0.0"], "--to", url, "--keys", keys, *s3],
        ["repo", "snapshot", "--repo", url, "--keys", keys, "--force", *s3],
        ["repo", "refresh", "--repo", url, "--keys", keys, "--force", *s3],
        ["channel", "promote", PRODUCT, "1.0.0", "--to", "beta", "--repo", url, "--keys", keys, *s3],
        ["repo", "verify", url, *s3],
        ["repo", "gc", "--repo", url, "--keys", keys, "--keep", "1", "--dry-run", *s3],
    ]
    for step in steps:
        r = _s3cli(*step)
        assert r.returncode == 0, (step, r.stderr)
    # and every command that takes a repository has them (a new command cannot forget them)
    import typer.main

    from abflip.cli import _app
    from abflip.commands.meta import walk

    for path, cmd in walk(typer.main.get_command(_app())):
        names = {o for p in cmd.params for o in getattr(p, "opts", [])}
        if names & {"--to", "--repo"} or path == ("repo", "verify"):
            assert {"--endpoint-url", "--region", "--profile"} <= names, path


def test_s3_errors_blame_what_is_wrong(moto, tmp_path, built):
    bucket = moto.new_bucket()
    url = f"s3://{bucket}/repo"
    keys = tmp_path / "keys"
    s3 = ["--endpoint-url", moto.endpoint, "--region", "us-east-1"]
    assert _s3cli("repo", "init", "--keys", keys, "--to", url, *s3).returncode == 0
    # a wrong prefix: what is not there, not the network
    for args in (["publish", built["1.0.0"], "--to", f"s3://{bucket}/rpeo", "--keys", keys],
                 ["repo", "status", "--repo", f"s3://{bucket}/rpeo"], ["repo", "verify", f"s3://{bucket}/rpeo"]):
        r = _s3cli(*args, *s3)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith(f"error (user): s3://{bucket}/rpeo holds no abflip repository"), r.stderr
        assert "network" not in r.stderr and "Traceback" not in r.stderr
    # an endpoint nobody listens on: transport, exit 4
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = _s3cli("repo", "status", "--repo", url, "--endpoint-url", dead, "--region", "us-east-1", timeout=300)
    assert r.returncode == 4, r.stderr
    assert r.stderr.startswith("error (transport): ") and "cannot reach the S3 endpoint" in r.stderr
    assert "--endpoint-url" in r.stderr
    # no credentials anywhere (and no instance metadata lookup: offline tests): the user's, exit 2
    env = {k: v for k, v in _no_abflip_env().items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", HOME=str(tmp_path))
    r = _s3cli("publish", built["1.0.0"], "--to", url, "--keys", keys, *s3, env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error (user): ") and "no AWS credentials found" in r.stderr
    r = _s3cli("repo", "status", "--repo", url, "--profile", "abflip-no-such-profile", *s3, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error (user): AWS profile"), r.stderr
