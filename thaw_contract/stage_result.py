"""A finished stage's result as the operator and users see it: one home for its keys.

Rank 0 writes it as its container's termination message (and the stage's final pointer keeps
the same summary); the operator reads the message, never the store, and copies the summary
into status.stages[k].result.
"""

from __future__ import annotations

# The trainer's StageResult field -> the key in status and in the termination message.
STATUS_FIELDS = {
    "best_val_accuracy": "valAccuracy",
    "test_accuracy": "testAccuracy",
    "epochs_run": "epochs",
    "trainable_params": "trainableParams",
    "diverged": "diverged",
    "collapsed": "collapsed",
    "bad_images": "badImages",
    "lr_found": "lrFound",
    "model": "model",  # the job's last stage: its model artifact (uri, sha256)
}
GATE_STATUS_FIELDS = ("decision", "metric", "value", "previous", "reason")
# Stage k's pods get the manifest digest stage k-1's rank 0 reported (and the operator recorded)
# here, and load stage k-1's final checkpoint only if its manifest still has that digest.
INPUT_DIGEST_ENV = "THAW_INPUT_MANIFEST_SHA256"
VAL_ACCURACY = STATUS_FIELDS["best_val_accuracy"]


def status_summary(result: dict) -> dict:
    """A StageResult (as a dict) as status shows it: camelCase keys, no history."""
    out = {name: result[k] for k, name in STATUS_FIELDS.items() if result.get(k) is not None}
    if result.get("gate"):  # the verdict, without the metrics it passes on
        out["gate"] = {k: result["gate"][k] for k in GATE_STATUS_FIELDS if result["gate"].get(k) not in (None, "")}
    return out


def stopped_the_job(summary: dict | None) -> bool:
    """Whether a committed stage's gate ended the job (gate.onRegression: stop): no later stage
    runs. The same key in the trainer's summary and in status.stages[k].result."""
    return bool(summary) and (summary.get("gate") or {}).get("decision") == "stopped"


def termination_message(index: int, name: str, checkpoint: str, digest: str, summary: dict) -> dict:
    """What rank 0 of a committed stage reports: the verified checkpoint and its summary."""
    return {"stage": index, "name": name, "checkpoint": checkpoint, "manifestSha256": digest, "metrics": summary}


def reports_stage(doc: dict | None, index: int) -> bool:
    """Whether a termination message is stage `index`'s committed result (not an error, not
    another stage's)."""
    return bool(doc) and doc.get("stage") == index and bool(doc.get("checkpoint"))
