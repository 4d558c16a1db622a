"""Checkpoint cost against a real SeaweedFS: how long training is blocked per checkpoint with
asynchronous vs synchronous saving, and upload throughput against plain boto3 `upload_file`.

    python benchmarks/bench_checkpoint.py --repeats 3 --out docs/benchmarks.md

The checkpoint is what the runner saves for ResNet-18 with AdamW (model + optimizer state,
~140 MB). Blocked time is what `CheckpointWriter.save` costs the training loop; the async
upload's total time is reported beside it to show it completed. Throughput sends the same bytes
with our S3Store.put (transfer manager from memory, 16 MiB parts, 8 threads) and with plain
`client.upload_file` from a file (boto3 defaults), alternating, best of the repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import write_section  # noqa: E402

from testbed.seaweedfs import SeaweedFS  # noqa: E402


def checkpoint_objects():
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()  # creates exp_avg / exp_avg_sq
    return {"model.pt": model.state_dict(), "train_state.pt": {"optimizer": opt.state_dict()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from thaw_contract.spec import CheckpointSpec
    from trainer import checkpoint as ckpt
    from trainer.storage import open_store
    from trainer.uploader import CheckpointWriter

    objects = checkpoint_objects()
    size = sum(len(b) for b in ckpt.encode(objects).values())
    with tempfile.TemporaryDirectory() as tmp:
        server = SeaweedFS(Path(tmp) / "weed", buckets=("bench",)).start()
        try:
            os.environ.update(server.env())
            store = open_store(CheckpointSpec(uri="s3://bench/ckpt"), "job")
            blocked = {"sync": [], "async": []}
            async_total = []
            for rep in range(args.repeats):
                for mode in ("sync", "async"):
                    writer = CheckpointWriter(store, CheckpointSpec(asynchronous=mode == "async"))
                    t0 = time.perf_counter()
                    blocked[mode].append(writer.save(f"{mode}-{rep}", objects, {"epoch": rep}))
                    writer.flush()
                    if mode == "async":
                        async_total.append(time.perf_counter() - t0)
                    writer.close()
                    assert ckpt.verify(store, f"{mode}-{rep}") is not None
            data = os.urandom(size)
            path = Path(tmp) / "blob"
            path.write_bytes(data)
            client = server.client()
            tput = {"thaw": [], "boto3": []}
            for rep in range(args.repeats):
                t0 = time.perf_counter()
                store.put(f"tput/thaw-{rep}", data)
                tput["thaw"].append(size / (time.perf_counter() - t0) / 1e6)
                t0 = time.perf_counter()
                client.upload_file(str(path), "bench", f"tput/boto3-{rep}")
                tput["boto3"].append(size / (time.perf_counter() - t0) / 1e6)
        finally:
            server.stop()

    med = {k: statistics.median(v) for k, v in blocked.items()}
    best = {k: max(v) for k, v in tput.items()}
    lines = [
        "## Checkpoint saving: blocked time and upload throughput (SeaweedFS)",
        "",
        f"Command: `python benchmarks/bench_checkpoint.py --repeats {args.repeats} --out docs/benchmarks.md`",
        "",
        f"Checkpoint: ResNet-18 + AdamW state, {size / 1e6:.0f} MB in two objects; SeaweedFS `weed mini` on "
        f"loopback, same machine; {os.cpu_count()} CPUs. Median of {args.repeats} alternating saves.",
        "",
        "| saving | training blocked per checkpoint | upload finished after |",
        "|---|---|---|",
        f"| synchronous (encode + upload in the loop) | {med['sync']:.2f} s | {med['sync']:.2f} s |",
        f"| asynchronous (host copy, upload in background) | {med['async']:.3f} s | "
        f"{statistics.median(async_total):.2f} s |",
        "",
        f"Blocked time ratio: **{med['sync'] / med['async']:.1f}x** less with asynchronous saving.",
        "",
        "| upload of the same bytes | best MB/s |",
        "|---|---|",
        f"| plain boto3 `upload_file` (defaults) | {best['boto3']:.0f} |",
        f"| Thaw S3Store.put (transfer manager, 16 MiB parts, 8 threads) | {best['thaw']:.0f} |",
        "",
        f"Throughput ratio: **{best['thaw'] / best['boto3']:.2f}x** plain boto3.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_section(args.out, "checkpoint", table)


if __name__ == "__main__":
    main()
