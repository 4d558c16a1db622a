"""JPEG decoding on these CPUs, and what data.workers: auto does to a training epoch.

    python benchmarks/bench_decode.py --out docs/benchmarks.md

1. Decoded images/s on one core (torch and every decoder held to one thread) for photo-sized
   JPEGs (500x375, quality 90, ~100 KB: ImageNet's typical size), each turned into a 224x224
   RGB uint8 tensor, side by side in one run:
   - Thaw's path before: torchvision.io.decode_image at full size, then the antialiased resize
     the trainer applies (trainer/data.py resize_uint8);
   - Thaw's path now: trainer/data.py decode_file (PIL with draft(), below, and PIL's resize);
   - PIL at full size, then PIL's bilinear resize;
   - PIL with draft() (libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8 size, the smallest
     still >= 224), then the same resize;
   - simplejpeg (libjpeg-turbo through a thin binding), installed into a scratch folder for
     this run only (never a product dependency), then the trainer's resize.
   With --cuda (benchmarks/gpu_check.sh, step decode), nvJPEG through torchvision.io.decode_jpeg
   on the device as well.
2. One training epoch through `python -m trainer run` on a folder of the same JPEGs
   (top 3 layer groups trainable, 224 px, one process), with data.workers: 0 against the
   default auto, images/s of the second epoch (the first warms the workers up).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import write_section  # noqa: E402

SIZE = 224
W, H = 500, 375  # ImageNet's typical photo
CAMERA = (1600, 1200)  # a phone or camera photo, as users' buckets also hold


def photo(i: int, w: int = W, h: int = H) -> bytes:
    """A photo-like JPEG: smooth structure plus fine texture (pure noise would compress badly
    and decode unlike a photo; a flat field too well)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    coarse = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    fine = rng.normal(0, 12, (h, w, 3))
    img = np.clip(np.asarray(coarse, dtype=np.float64) + fine, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).save(out, "JPEG", quality=90)
    return out.getvalue()


def decoders(scratch: Path) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    from trainer.data import decode_file, resize_uint8

    def thaw(data: bytes) -> torch.Tensor:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return resize_uint8(decode_image(raw, mode=ImageReadMode.RGB), SIZE)

    def pil(data: bytes, draft: bool = False) -> torch.Tensor:
        img = Image.open(io.BytesIO(data))
        if draft:
            img.draft("RGB", (SIZE, SIZE))
        img = img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)

    out = {
        "torchvision decode_image + the trainer's resize (Thaw before)": thaw,
        "Thaw now: trainer.data.decode_file (PIL: draft(), its resize)": lambda data: resize_uint8(
            decode_file(io.BytesIO(data), SIZE),
            SIZE,  # already SIZE: the trainer's resize passes it through
        ),
        "PIL, full size + PIL's resize": pil,
        "PIL with draft() + PIL's resize": lambda data: pil(data, draft=True),
    }
    target = scratch / "simplejpeg"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--target", str(target), "simplejpeg"]
    if subprocess.run(pip, capture_output=True).returncode == 0:
        sys.path.insert(0, str(target))
        import simplejpeg

        def sj(data: bytes) -> torch.Tensor:
            rgb = simplejpeg.decode_jpeg(data, colorspace="RGB")
            return resize_uint8(torch.from_numpy(rgb).permute(2, 0, 1), SIZE)

        out["simplejpeg + the trainer's resize"] = sj
    return out


def nvjpeg(sets: list[list[bytes]], rounds: int, batch: int = 64) -> list[float]:
    """Images/s through nvJPEG (torchvision.io.decode_jpeg on the device, a batch at a time) and
    the trainer's resize on the GPU: the whole device, not one core."""
    import torch
    from torchvision.io import decode_jpeg

    from trainer.data import resize_batch_uint8

    rates = []
    for images in sets:
        raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in images]
        best = 0.0
        for _ in range(rounds + 1):  # the first round loads nvJPEG
            torch.cuda.synchronize()
            t = time.perf_counter()
            for i in range(0, len(raw), batch):
                out = decode_jpeg(raw[i : i + batch], device="cuda")
                torch.stack([resize_batch_uint8(x[None], SIZE)[0] for x in out])  # one 224 px batch
            torch.cuda.synchronize()
            best = max(best, len(raw) / (time.perf_counter() - t))
        rates.append(best)
    return rates


def per_core(sets: list[list[bytes]], scratch: Path, rounds: int) -> list[tuple[str, list[float]]]:
    """Each decoder's images/s on one core, for each set of images."""
    import torch

    torch.set_num_threads(1)
    rows = []
    for name, fn in decoders(scratch).items():
        rates = []
        for images in sets:
            fn(images[0])  # import and first-call costs out of the timing
            best = 0.0
            for _ in range(rounds):  # best of a few: the machine is shared
                t = time.perf_counter()
                for data in images:
                    assert fn(data).shape == (3, SIZE, SIZE)
                best = max(best, len(images) / (time.perf_counter() - t))
            rates.append(best)
        rows.append((name, rates))
    return rows


def epoch(folder: Path, workers, scratch: Path, per_class: int) -> float:
    """Images/s of the second epoch of a top-3 stage at 224 px, one process."""
    doc = {
        "apiVersion": "thaw.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"w{workers}"},
        "spec": {
            "model": {"architecture": "efficientnet_lite0", "weights": "BUNDLED", "numClasses": 10},
            "data": {
                "source": f"file://{folder}",
                "imageSize": SIZE,
                "trainPerClass": per_class,
                "valPerClass": 2,
                "testLimit": 20,
                "batchSize": 32,
                "workers": workers,
            },
            "speed": {"dataOnDevice": "off"},
            "stages": [{"name": "top3", "trainable": {"top": 3}, "epochs": 2, "lr": 0.01}],
            "checkpoint": {"uri": f"file://{scratch}/store-{workers}"},
        },
    }
    path = scratch / f"w{workers}.yaml"
    path.write_text(json.dumps(doc))
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "run", str(path)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"event": "epoch"')]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("data: "))
    return rows[-1]["images_per_second"], line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200, help="JPEGs per decoder round")
    ap.add_argument("--per-class", type=int, default=40, help="training images per class for the epochs")
    ap.add_argument("--cuda", action="store_true", help="add nvJPEG on the GPU (benchmarks/gpu_check.sh)")
    ap.add_argument("--section", default="decode")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        images = [photo(i) for i in range(args.images)]
        camera = [photo(i, *CAMERA) for i in range(max(args.images // 4, 1))]
        kb = [sum(map(len, xs)) / len(xs) / 1024 for xs in (images, camera)]
        decode = per_core([images, camera], scratch, rounds=3)
        gpu = nvjpeg([images, camera], rounds=3) if args.cuda else None
        folder = scratch / "photos"
        n = args.per_class + 2
        for split, count in (("train", n), ("test", 2)):
            for c in range(10):
                d = folder / split / f"c{c}"
                d.mkdir(parents=True)
                for k in range(count):
                    (d / f"{k}.jpg").write_bytes(images[(c * n + k) % len(images)])
        epochs = [(w, *epoch(folder, w, scratch, args.per_class)) for w in (0, "auto")]
    base = decode[0][1]
    where = " on the GPU machine" if args.cuda else ""
    lines = [
        f"## Decoding JPEGs, and `data.workers: auto`{where}",
        "",
        f"Command: `python benchmarks/bench_decode.py --images {args.images} --per-class {args.per_class}"
        f"{' --cuda' if args.cuda else ''}`; "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), one run. Synthetic photo JPEGs at "
        f"quality 90: {args.images} at {W}x{H} (~{kb[0]:.0f} KB, ImageNet's typical size) and {len(camera)} at "
        f"{CAMERA[0]}x{CAMERA[1]} (~{kb[1]:.0f} KB, a camera photo), each decoded to a {SIZE}x{SIZE} RGB uint8 "
        "tensor on one core (torch at one thread); best of 3 rounds.",
        "",
        f"| decoder | {W}x{H}: images/s per core | vs before | {CAMERA[0]}x{CAMERA[1]}: images/s per core "
        "| vs before |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {r[0]:.0f} | {r[0] / base[0]:.2f}x | {r[1]:.0f} | {r[1] / base[1]:.2f}x |"
            for name, r in decode
        ),
        *(
            [
                f"| nvJPEG on the GPU (whole device) + the trainer's resize there | {gpu[0]:.0f} | "
                f"{gpu[0] / base[0]:.2f}x | {gpu[1]:.0f} | {gpu[1] / base[1]:.2f}x |"
            ]
            if gpu
            else []
        ),
        "",
        f"A top-3 stage at {SIZE} px on a folder of the {W}x{H} JPEGs ({10 * args.per_class} training images, "
        "batch 32, one process, `speed.dataOnDevice: off`), second epoch:",
        "",
        "| data.workers | what the trainer said | training images/s | vs workers: 0 |",
        "|---|---|---|---|",
        *(f"| {w} | {said} | {rate:.1f} | {rate / epochs[0][1]:.2f}x |" for w, rate, said in epochs),
    ]
    print("\n".join(lines))
    if args.out:
        write_section(args.out, args.section, "\n".join(lines))


if __name__ == "__main__":
    main()
