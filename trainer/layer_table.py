"""Writes thaw_contract/layer_table.json.gz from the networks themselves (needs torch):

    python -m trainer.layer_table --write

The table is the contract's (the operator plans stages from it without torch); building it
needs the models, so the builder lives here.
"""

from __future__ import annotations

import gzip
import json
import sys

from thaw_contract.catalog import ARCHITECTURES
from thaw_contract.layer_table import TABLE
from thaw_contract.spec import ModelSpec
from trainer.layers import head_module_name, layer_groups
from trainer.models import build_model


def compute(architecture: str) -> dict:
    """One row of the table, from the network itself (needs torch and torchvision)."""
    spec = ModelSpec(architecture=architecture, num_classes=1000, replace_head=False)
    model = build_model(spec, device="meta").model
    groups = layer_groups(model, architecture)
    head = model.get_submodule(head_module_name(architecture))
    outputs = [m.out_features for m in head.modules() if hasattr(m, "out_features")][-1]
    head_name = head_module_name(architecture)
    return {
        "groups": [[g.name, list(g.prefixes)] for g in groups],
        "params": [n for n, _ in model.named_parameters()],
        "modules": [n for n, _ in model.named_modules() if n],
        "head": head_name,
        "headOutputs": outputs,
    }


def main(argv: list[str]) -> int:
    if argv != ["--write"]:
        print("usage: python -m trainer.layer_table --write", file=sys.stderr)
        return 2
    table = {}
    for arch in sorted(ARCHITECTURES):
        table[arch] = compute(arch)
        print(f"{arch}: {len(table[arch]['groups'])} groups, {len(table[arch]['params'])} parameters", flush=True)
    # mtime=0: the same table gives the same bytes, so git sees real changes only.
    with gzip.GzipFile(TABLE, "wb", mtime=0) as f:
        f.write(json.dumps(table, separators=(",", ":"), sort_keys=True).encode())
    print(f"wrote {TABLE} ({TABLE.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
