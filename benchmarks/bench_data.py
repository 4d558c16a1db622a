"""A dataset prefix of many small JPEGs, from a real SeaweedFS to local disk: Thaw's data sync
against the clients users would otherwise reach for, side by side in one run.

    python benchmarks/bench_data.py --sizes 1000,10000 --out docs/benchmarks.md

Each size uploads that many synthetic 96 px JPEGs (~6-8 KB, ImageFolder layout, 10 classes)
under a prefix, then mirrors the prefix into an empty folder with, in turn:
- `sync_prefix` (trainer/datasync.py, what a stage pod runs: 32 GETs in flight);
- `sync_prefix` with one GET at a time (the same code, threads=1);
- a plain 32-thread boto3 GET client (the "32 parallel GETs" reference);
- `rclone copy --transfers 32` where rclone is installed (Debian's `rclone`);
- the same images as one tar object: one GET, then unpacked.
Then the sync runs again over the unchanged prefix (what every later run on the node costs).
Objects/s is objects / wall seconds of the whole mirror, listing included.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import write_section  # noqa: E402

from testbed.seaweedfs import SeaweedFS  # noqa: E402

THREADS = 32


def jpeg(i: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    base = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)  # ~6-7 KB at 96 px: a small photo JPEG
    img = Image.fromarray(base).resize((96, 96), Image.BICUBIC)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def upload(client, n: int, prefix: str) -> tuple[int, bytes]:
    """n JPEGs under prefix/train/cK/; returns (total bytes, the same files as one tar)."""
    files = [(f"train/c{i % 10}/img{i:07d}.jpg", jpeg(i)) for i in range(n)]
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket="data", Key=f"{prefix}/{kv[0]}", Body=kv[1]), files))
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        for name, body in files:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            t.addfile(info, io.BytesIO(body))
    return sum(len(b) for _, b in files), tar.getvalue()


def plain_client(client, prefix: str, dest: Path) -> None:
    """The reference: list, then 32 threads each GET an object and write it."""
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="data", Prefix=f"{prefix}/")
        for o in page.get("Contents", [])
    ]

    def get(key: str) -> None:
        path = dest / key[len(prefix) + 1 :]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(client.get_object(Bucket="data", Key=key)["Body"].read())

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(get, keys))


def rclone(server: SeaweedFS, prefix: str, dest: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"},  # plain http: a bundle only breaks its SDK
        "RCLONE_CONFIG_S3_TYPE": "s3",
        "RCLONE_CONFIG_S3_PROVIDER": "Other",
        "RCLONE_CONFIG_S3_ENDPOINT": server.endpoint,
        "RCLONE_CONFIG_S3_ACCESS_KEY_ID": server.env()["AWS_ACCESS_KEY_ID"],
        "RCLONE_CONFIG_S3_SECRET_ACCESS_KEY": server.env()["AWS_SECRET_ACCESS_KEY"],
        "RCLONE_CONFIG_S3_FORCE_PATH_STYLE": "true",
    }
    cmd = ["rclone", "copy", f"s3:data/{prefix}", str(dest), "--transfers", str(THREADS), "--checkers", "32"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"rclone failed: {proc.stderr[-1500:]}")


def tar_object(client, key: str, dest: Path) -> None:
    body = client.get_object(Bucket="data", Key=key)["Body"]
    with tarfile.open(fileobj=body, mode="r|") as t:
        t.extractall(dest, filter="data")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def count(dest: Path) -> int:
    return sum(1 for p in dest.rglob("*.jpg"))


def run_size(server: SeaweedFS, client, n: int, work: Path, serial_max: int) -> list[tuple[str, float, str]]:
    from trainer.datasync import sync_prefix

    prefix = f"set{n}"
    size, tar = upload(client, n, prefix)
    client.put_object(Bucket="data", Key=f"{prefix}.tar", Body=tar)
    rows: list[tuple[str, float, str]] = []

    def fresh(name: str) -> Path:
        d = work / f"{prefix}-{name}"
        shutil.rmtree(d, ignore_errors=True)
        return d

    uri = f"s3://data/{prefix}"
    d = fresh("thaw")
    rows.append(("Thaw `sync_prefix` (32 GETs in flight)", timed(lambda: sync_prefix(uri, d)), ""))
    assert count(d) == n
    again = timed(lambda: sync_prefix(uri, d))
    if n <= serial_max:  # ~170 objects/s: 10 minutes at 100,000, and it says nothing new there
        d1 = fresh("serial")
        rows.append(("`sync_prefix(threads=1)`: one GET at a time", timed(lambda: sync_prefix(uri, d1, threads=1)), ""))
    d2 = fresh("plain")
    rows.append(("plain boto3 client, 32 threads", timed(lambda: plain_client(client, prefix, d2)), ""))
    assert count(d2) == n
    if shutil.which("rclone"):
        d3 = fresh("rclone")
        rows.append(("`rclone copy --transfers 32`", timed(lambda: rclone(server, prefix, d3)), ""))
        assert count(d3) == n
    d4 = fresh("tar")
    rows.append(("one tar object (GET + unpack)", timed(lambda: tar_object(client, f"{prefix}.tar", d4)), ""))
    assert count(d4) == n
    rows.append(("Thaw `sync_prefix` again, prefix unchanged", again, "downloads 0 objects"))
    print(f"{n} objects, {size / n / 1024:.1f} KiB each on average", flush=True)
    for name, seconds, note in rows:
        print(f"  {name:<48} {seconds:8.2f} s  {n / seconds:8.0f} objects/s {note}", flush=True)
    for d in work.glob(f"{prefix}-*"):
        shutil.rmtree(d, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--serial-max", type=int, default=10_000, help="the one-GET-at-a-time row up to this size")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = SeaweedFS(Path(tmp) / "weed", buckets=("data",)).start()
        try:
            os.environ.update(server.env())
            client = server.client()
            for n in sizes:
                results[n] = run_size(server, client, n, Path(tmp) / "work", args.serial_max)
        finally:
            server.stop()
    if args.out:
        lines = [
            "## Data: a prefix of small JPEGs from SeaweedFS to local disk",
            "",
            f"`python benchmarks/bench_data.py --sizes {args.sizes} --out docs/benchmarks.md` "
            f"({os.cpu_count()} cores; SeaweedFS on the same machine; synthetic 96 px JPEGs, 10 classes; "
            "each row one run, all rows of a size in the same run; objects/s over the whole mirror, listing "
            "included; ratio: against the plain 32-thread client of the same size; the one-GET-at-a-time row "
            f"only up to {args.serial_max:,} objects).",
            "",
            "| objects | client | seconds | objects/s | ratio |",
            "|---|---|---|---|---|",
        ]
        for n, rows in results.items():
            ref = next(s for name, s, _ in rows if name.startswith("plain"))
            for name, seconds, note in rows:
                extra = f" ({note})" if note else ""
                lines.append(f"| {n:,} | {name}{extra} | {seconds:.2f} | {n / seconds:,.0f} | {ref / seconds:.2f}x |")
        write_section(args.out, "data", "\n".join(lines))


if __name__ == "__main__":
    main()
