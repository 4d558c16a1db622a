"""The artifact's serving formats (spec.export): ONNX and TorchScript, each checked on the test split.

Both take what a server receives: RGB pixels as uint8, (N, 3, S, S) at the model's input size,
and return logits; the scaling and normalization the model was trained with is inside the
graph, so a client only decodes and resizes. A format is published only if, on every image of
the job's test split, it picks the class the torch model picks (near-ties aside: at least
MIN_AGREEMENT of the images) and no logit differs by more than MAX_LOGIT_DIFF; what it measured
goes into config.json. A model the exporter cannot trace, or one that disagrees, is one line
naming spec.export: the checkpoints stay as they were and nothing is published.

ONNX goes through torch.onnx's recommended exporter (torch.export, `dynamo=True`; it needs the
onnx and onnxscript packages) with a dynamic batch dimension, and is checked with ONNX Runtime.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from thaw_contract.spec import SpecError

FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
INPUT, OUTPUT = "pixels", "logits"
MIN_AGREEMENT = 0.999
MAX_LOGIT_DIFF = 1e-3


class Pixels(nn.Module):
    """The model behind its preprocessing: uint8 RGB (N, 3, S, S) in, logits out."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels.float() / 255 - self.mean) / self.std)


def export(fmt: str, wrapped: Pixels, size: int, batches: Callable[[], Iterable[torch.Tensor]], arch: str):
    """(file bytes, check) for one format; a SpecError naming spec.export when it cannot be made
    or does not agree with the torch model on `batches()` (the test split's uint8 images)."""
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    try:
        data, run = (_onnx if fmt == "onnx" else _torchscript)(wrapped, example)
    except Exception as err:  # noqa: BLE001 - the exporters raise many kinds; one line names the cause
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise SpecError(f"spec.export: {fmt}: {arch} cannot be exported ({type(err).__name__}: {first})") from None
    check = compare(wrapped, run, batches())
    if check["images"] and (check["top1Agreement"] < MIN_AGREEMENT or check["maxLogitDiff"] > MAX_LOGIT_DIFF):
        raise SpecError(
            f"spec.export: {fmt}: disagrees with the torch model on the test split (top-1 agreement "
            f"{check['top1Agreement']:.4f}, max logit difference {check['maxLogitDiff']:.2g}; allowed "
            f">= {MIN_AGREEMENT}, <= {MAX_LOGIT_DIFF:g}); nothing was published"
        )
    return data, check


def compare(wrapped: Pixels, run: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor]) -> dict:
    """How the exported model's logits match the torch model's over the batches."""
    n = agree = 0
    worst = 0.0
    with torch.no_grad():
        for x in batches:
            ref, got = wrapped(x), run(x)
            n += len(x)
            agree += int((ref.argmax(1) == got.argmax(1)).sum())
            worst = max(worst, float((ref - got).abs().max()))
    return {"images": n, "top1Agreement": agree / n if n else None, "maxLogitDiff": worst}


def _onnx(wrapped: Pixels, example: torch.Tensor):
    import onnxruntime

    program = torch.onnx.export(
        wrapped,
        (example,),
        dynamo=True,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, FILES["onnx"])
        program.save(path, external_data=False)  # one self-contained file (the weights inside)
        with open(path, "rb") as f:
            data = f.read()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])

    return data, run


def _torchscript(wrapped: Pixels, example: torch.Tensor):
    # TorchScript is deprecated upstream (torch.export replaces it) but is what TorchServe and
    # Triton's PyTorch backend load: offered, its FutureWarnings kept out of the job's log.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(wrapped, example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        data = buf.getvalue()
        loaded = torch.jit.load(io.BytesIO(data))  # what a server loads, not the object in memory
    return data, loaded
