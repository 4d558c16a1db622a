"""A data set of many small JPEGs in SeaweedFS, as a plain prefix and as shards (`trainer pack`):
how long until the first training batch, and a whole epoch's input rate, side by side in one run.

    python benchmarks/bench_shards.py --sizes 1000,10000,100000 --out docs/benchmarks.md

For each size: that many synthetic 96 px JPEGs (bench_data.jpeg, ~7 KB, 10 classes) as an
ImageFolder (train/, and test/ with a tenth as many), uploaded under a prefix and packed by
`trainer pack` into 64 MiB shards under another. Then, each from an empty cache, in one process:
- **first batch**: from nothing to the first batch of 64 images at 64 px a rank gets (the data
  set's preparation, its fetch, the splits, one decoded batch): for the prefix that is
  `sync_prefix` of the whole prefix first (what a stage pod does), for shards the manifest and
  the rank's first shard;
- **epoch**: the rest of that epoch through the same loader (workers 0, one rank), images/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_data import jpeg  # noqa: E402
from report import write_section  # noqa: E402

from testbed.seaweedfs import SeaweedFS  # noqa: E402

BATCH, SIZE = 64, 64


def image_folder(root: Path, n: int) -> list[Path]:
    files = []
    for split, count in (("train", n), ("test", max(10, n // 10))):
        for i in range(count):
            p = root / split / f"c{i % 10}" / f"img{i:07d}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(jpeg(i))
            files.append(p)
    return files


def first_batch_and_epoch(source: str, cache: Path) -> tuple[float, float, int]:
    """(seconds to the first batch, epoch images/s after it, images in the epoch), one rank."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from thaw_contract.spec import DataSpec
    from trainer.data import build_datasets
    from trainer.datasync import cache_path, sync_prefix
    from trainer.shards import ShardSampler, ShardSplit, is_shard_source

    t0 = time.perf_counter()
    spec = DataSpec(source=source, image_size=SIZE, val_per_class=5, cache_dir=str(cache), max_bad_fraction=0.01)
    if not is_shard_source(source):
        dest = cache_path(str(cache), source)
        sync_prefix(source, dest)
        spec = spec.model_copy(update={"source": f"file://{dest}"})
    data = build_datasets(spec, 10, seed=0)
    if isinstance(data.train.split.folder, ShardSplit):
        sampler = ShardSampler(data.train, world=1, rank=0, seed=0)
    else:
        sampler = DistributedSampler(data.train, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = iter(DataLoader(data.train, batch_size=BATCH, sampler=sampler, num_workers=0))
    x, _ = next(loader)
    first = time.perf_counter() - t0
    assert x.shape == (BATCH, 3, SIZE, SIZE) and x.dtype == torch.uint8
    t1, seen = time.perf_counter(), 0
    for x, _ in loader:
        seen += len(x)
    return first, seen / (time.perf_counter() - t1), seen + BATCH


def run_size(client, n: int, work: Path) -> dict:
    from trainer.pack import pack

    src = work / f"src{n}"
    files = image_folder(src, n)
    with ThreadPoolExecutor(32) as pool:
        put = lambda p: client.put_object(Bucket="data", Key=f"raw{n}/{p.relative_to(src)}", Body=p.read_bytes())  # noqa: E731
        list(pool.map(put, files))
    t = time.perf_counter()
    doc = pack(str(src), f"s3://data/packed{n}", log=lambda _: None)
    packed = time.perf_counter() - t
    shutil.rmtree(src)
    row = {"pack": packed, "nshards": sum(len(v) for v in doc["splits"].values())}
    for name, source in (("prefix", f"s3://data/raw{n}"), ("shards", f"s3://data/packed{n}")):
        cache = work / f"cache-{name}{n}"
        row[name] = first_batch_and_epoch(source, cache)
        shutil.rmtree(cache, ignore_errors=True)
    print(f"{n}: {row}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = SeaweedFS(Path(tmp) / "weed", buckets=("data",)).start()
        try:
            os.environ.update(server.env())
            for n in (int(s) for s in args.sizes.split(",")):
                results[n] = run_size(server.client(), n, Path(tmp))
        finally:
            server.stop()
    if not args.out:
        return
    lines = [
        "## Shards: time to the first batch and an epoch's input, a prefix against `trainer pack`'s shards",
        "",
        f"`python benchmarks/bench_shards.py --sizes {args.sizes} --out docs/benchmarks.md` ({os.cpu_count()} "
        "cores; SeaweedFS on the same machine; synthetic 96 px JPEGs of ~7 KB, 10 classes, a tenth as many test "
        f"images; one process, one rank, workers 0, an empty cache; batches of {BATCH} at {SIZE} px; each row one "
        "run, both sources of a size in the same run). First batch: from nothing to the first decoded batch "
        "(the prefix is mirrored whole first, as a stage pod does; shards need the manifest and the first shard). "
        "Epoch: the rest of that epoch's training images through the same loader, decoding included.",
        "",
        "| train images | source | first batch (s) | epoch images/s | shards | pack (s) |",
        "|---|---|---|---|---|---|",
    ]
    for n, row in results.items():
        for name in ("prefix", "shards"):
            first, ips, _ = row[name]
            extra = (f"{row['nshards']}", f"{row['pack']:.1f}") if name == "shards" else ("", "")
            lines.append(f"| {n:,} | {name} | {first:.2f} | {ips:,.0f} | {extra[0]} | {extra[1]} |")
    write_section(args.out, "shards", "\n".join(lines))


if __name__ == "__main__":
    main()
