"""The FineTuneJob CustomResourceDefinition, generated from the trainer's spec models.

One source of truth: `thaw_contract.spec.FineTuneJobSpec` (pydantic) gives the JSON Schema; this
module turns it into a structural OpenAPI v3 schema (refs inlined, nullable instead of
`anyOf [X, null]`, OpenAPI's boolean exclusive bounds), keeps every field description (for
`kubectl explain`) and scalar default, and adds CEL rules (`x-kubernetes-validations`) for
what a per-field schema cannot say: cross-field checks and fields that must not change.

    python -m thaw_operator.crd > manifests/crd/finetunejobs.thaw.dev.yaml
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from pydantic.alias_generators import to_camel

from thaw_contract.spec import (
    API_VERSION,
    CHECKPOINT_URI_PATTERN,
    DATA_SOURCE_PATTERN,
    ENDPOINT_PATTERN,
    KIND,
    NAME_PATTERN,
    QUANTITY,
    TRAINING_FIELDS,
    FineTuneJobSpec,
)

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "finetunejobs"
MAX_STAGES = 32  # ULMFiT-style schedules stay far below; the CEL cost budget scales with it
MAX_NAME = 40  # stage Jobs are named <name>-<k>-a<attempt>: Job and pod names stay within 63


def _immutable_paths() -> list[str]:
    """Training fields (thaw_contract.spec.TRAINING_FIELDS, camelCase): a running job's checkpoints
    were written under them. The rest, data.workers included, may change."""
    out = []
    for field, sub in TRAINING_FIELDS.items():
        name = to_camel(field)
        out += [name] if sub is True else [f"{name}.{to_camel(s)}" for s in sorted(sub)]
    return out


IMMUTABLE = tuple(_immutable_paths())


# Extra schema keywords where the pydantic models cannot express them as plain JSON Schema.
EXTRA: dict[tuple[str, ...], dict] = {
    ("stages",): {"minItems": 1, "maxItems": MAX_STAGES},
    ("checkpoint", "uri"): {"pattern": CHECKPOINT_URI_PATTERN},
    ("data", "source"): {"pattern": DATA_SOURCE_PATTERN},
    ("checkpoint", "endpoint"): {"pattern": ENDPOINT_PATTERN},
    ("data", "endpoint"): {"pattern": ENDPOINT_PATTERN},
    # Stage names become object names; bounded lengths also keep the CEL cost estimate in budget.
    ("stages", "*", "name"): {"maxLength": 32},
    # lr is a number or "auto": no structural type holds both, and CEL cannot see a field without
    # one. OpenAPI applies `minimum` to numbers only and `pattern` to strings only, so together
    # they say "a positive number, or the word auto".
    ("stages", "*", "lr"): {"minimum": 0, "exclusiveMinimum": True, "pattern": "^auto$"},
    ("data", "workers"): {"minimum": 0, "pattern": "^auto$"},  # a count or auto, the same way
    ("dataCache", "size"): {"pattern": f"^{QUANTITY}$"},
}


def _spec_rules() -> list[dict]:
    rules = [
        {
            "rule": "has(self.stages) != has(self.gradual)",
            "message": "give exactly one of stages or gradual",
        },
        {
            "rule": "!has(self.gradual) || has(self.gradual.epochs) != has(self.gradual.epochsPerStage)",
            "message": "give exactly one of gradual.epochs or gradual.epochsPerStage",
            "fieldPath": ".gradual",
        },
        {
            "rule": "!has(self.stages) || self.stages.all(s, !has(s.name) || "
            "self.stages.filter(t, has(t.name) && t.name == s.name).size() == 1)",
            "message": "stage names must be unique",
            "fieldPath": ".stages",
        },
        {
            "rule": "self.data.batchSize % (self.nodes * (self.gpusPerNode > 0 ? self.gpusPerNode : 1)) == 0",
            "message": "data.batchSize must split evenly over nodes x gpusPerNode training processes",
            "fieldPath": ".data.batchSize",
        },
        {
            "rule": "!has(self.stages) || self.stages.all(s, !has(s.batchSize) || "
            "s.batchSize % ((has(s.nodes) ? s.nodes : self.nodes) * "
            "((has(s.gpusPerNode) ? s.gpusPerNode : self.gpusPerNode) > 0 ? "
            "(has(s.gpusPerNode) ? s.gpusPerNode : self.gpusPerNode) : 1)) == 0)",
            "message": "a stage's batchSize must split evenly over its nodes x gpusPerNode training processes",
            "fieldPath": ".stages",
        },
    ]
    for f in IMMUTABLE:
        rules.append(
            {
                "rule": f"has(self.{f}) == has(oldSelf.{f}) && (!has(self.{f}) || self.{f} == oldSelf.{f})",
                "message": f"spec.{f} cannot change after creation (checkpoints were written under it); "
                "create a new FineTuneJob",
            }
        )
    rules.append(
        {
            "rule": "has(self.checkpoint) == has(oldSelf.checkpoint) && "
            "(!has(self.checkpoint) || self.checkpoint.uri == oldSelf.checkpoint.uri)",
            "message": "spec.checkpoint.uri cannot change after creation",
        }
    )
    return rules


def _convert(node: dict, defs: dict, path: tuple[str, ...]) -> dict:
    if "$ref" in node:
        target = _convert(defs[node["$ref"].rsplit("/", 1)[-1]], defs, path)
        if "description" in node:
            target["description"] = node["description"]
        return target
    out: dict[str, Any] = {}
    if "anyOf" in node:
        members = [m for m in node["anyOf"] if m != {"type": "null"}]
        if len(members) == 1:
            out = _convert(members[0], defs, path)
            out["nullable"] = True
        else:
            out = {"x-kubernetes-preserve-unknown-fields": True}
    elif "oneOf" in node:  # string-or-object unions (trainable): CEL cannot type them; the operator checks
        out = {"x-kubernetes-preserve-unknown-fields": True}
    else:
        for key in ("type", "enum", "minimum", "maximum", "pattern", "minItems", "maxItems", "format"):
            if key in node:
                out[key] = node[key]
        if "const" in node:
            out["enum"] = [node["const"]]
        for bound, name in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if bound in node:
                out[name], out[bound] = node[bound], True
        if "properties" in node:
            out["properties"] = {k: _convert(v, defs, (*path, k)) for k, v in node["properties"].items()}
            if node.get("required"):
                out["required"] = list(node["required"])
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = _convert(extra, defs, (*path, "*"))
        elif extra is True:
            out["x-kubernetes-preserve-unknown-fields"] = True
        if "items" in node:
            out["items"] = _convert(node["items"], defs, (*path, "*"))
        elif "prefixItems" in node:  # fixed-length tuples (Adam betas): same item type, exact length
            out["items"] = _convert(node["prefixItems"][0], defs, (*path, "*"))
            out["minItems"] = out["maxItems"] = len(node["prefixItems"])
    if node.get("description"):
        out["description"] = " ".join(node["description"].split())
    default = node.get("default")
    if default is not None and not isinstance(default, (dict, list)):
        out["default"] = default
    for key, value in EXTRA.get(path, {}).items():
        out[key] = value
    return out


def spec_schema() -> dict:
    raw = FineTuneJobSpec.model_json_schema(by_alias=True)
    schema = _convert(raw, raw.get("$defs", {}), ())
    schema["description"] = "What to fine-tune, on what data, in which stages, and where it runs."
    schema["x-kubernetes-validations"] = _spec_rules()
    return schema


def status_schema() -> dict:
    obj = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return {
        "type": "object",
        "description": "Written by the operator.",
        "properties": {
            "phase": {"type": "string", "description": "Pending, Running, Queued, Suspended, Succeeded or Failed"},
            "currentStage": {"type": "integer", "description": "index of the stage running or next to run"},
            "stageProgress": {"type": "string", "description": "stages finished / stages"},
            "valAccuracy": {"type": "number", "description": "val accuracy of the last stage's committed weights"},
            "model": {
                "type": "object",
                "description": "the model artifact the job published (python -m trainer predict URI IMAGES...)",
                "properties": {"uri": {"type": "string"}, "sha256": {"type": "string"}},
            },
            "observedGeneration": {"type": "integer"},
            "message": {"type": "string"},
            "completionTime": {
                "type": "string",
                "format": "date-time",
                "description": "when it became Succeeded or Failed (ttlSecondsAfterFinished counts from here)",
            },
            "stages": {
                "type": "array",
                "items": obj,
                "description": "per stage: phase, attempts, times, checkpoint, result, notStarting (why its pods "
                "cannot start, since when)",
            },
            "ignoredPods": {
                "type": "array",
                "items": {"type": "string"},
                "description": "pods that carried a stage Job's labels without being its: never read (the last 20)",
            },
            "conditions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["type", "status"],
                    "properties": {
                        "type": {"type": "string"},
                        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                        "reason": {"type": "string"},
                        "message": {"type": "string"},
                        "lastTransitionTime": {"type": "string", "format": "date-time"},
                        "observedGeneration": {"type": "integer"},
                    },
                },
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
        },
    }


def crd() -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "thaw"}},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["ftj"],
                "categories": ["thaw"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Stage", "type": "string", "jsonPath": ".status.stageProgress"},
                        {
                            "name": "Val accuracy",
                            "type": "number",
                            "format": "float",
                            "jsonPath": ".status.valAccuracy",
                        },
                        {"name": "Model", "type": "string", "jsonPath": ".status.model.uri", "priority": 1},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "Fine-tunes a pretrained model by staged unfreezing: one distributed "
                            "Job per stage, handing over through verified checkpoints.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                            "x-kubernetes-validations": [
                                {
                                    "rule": f"size(self.metadata.name) <= {MAX_NAME}",
                                    "message": f"metadata.name must be at most {MAX_NAME} characters",
                                },
                                {
                                    "rule": f"self.metadata.name.matches('{NAME_PATTERN}')",
                                    "message": "metadata.name must start with a letter: stage Services are "
                                    "named <name>-<stage> and must be DNS-1035 labels",
                                },
                            ],
                        }
                    },
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated from thaw_contract/spec.py by `python -m thaw_operator.crd`; do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(render())
