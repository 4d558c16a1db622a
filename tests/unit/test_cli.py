"""`python -m trainer plan` prints the resolved stages; bad specs exit 2 with one line."""

from __future__ import annotations

import yaml

from tests.builders import job_doc, with_path
from trainer.__main__ import main


def test_plan_prints_groups_stages_counts_and_rates(capsys):
    assert main(["plan", "examples/quickstart.yaml"]) == 0
    out = capsys.readouterr().out
    assert "quickstart: efficientnet_lite0, 10 layer groups, 3,383,818 parameters" in out
    assert "[0] head: 8 epochs, batch 50, cosine, trainable 12,810 (0.4%), lr head=0.01" in out
    assert "[1] top3: 4 epochs" in out and "trainable 1,030,410 (30.5%)" in out and "stage7=0.00444" in out
    assert "[2] all:" in out and "(100.0%)" in out
    gates = [line.strip() for line in out.splitlines() if line.strip().startswith("gate:")]
    assert (
        gates
        == [  # every stage after the first, at the spec's default
            "gate: val_accuracy worse than the stage before on the same validation images (McNemar, p < 0.05) "
            "-> roll back to the weights before it"
        ]
        * 2
    )
    # How small a drop the paired test can see on the quickstart's 10 x 30 validation images.
    seen = "the gate sees a drop of 3.0 / 3.3 / 4.7 points on 300 validation images where 5% / 10% / 20% of them change"
    assert [line.strip() for line in out.splitlines() if line.strip().startswith("the gate sees")] == [seen] * 2
    assert "warning" not in out
    assert "input: RGB at 64 px, scaled to [0, 1], then (x - mean) / std with mean (0.500, 0.500, 0.500)" in out
    bn = [line.strip() for line in out.splitlines() if line.strip().startswith("BatchNorm:")]
    assert bn == [  # the quickstart freezes the statistics once the backbone trains
        "BatchNorm: layers in trainable groups update their statistics; frozen groups' stay fixed",
        "BatchNorm: every layer's statistics stay fixed, trainable ones too (freezeBnStats)",
        "BatchNorm: every layer's statistics stay fixed, trainable ones too (freezeBnStats)",
    ]


def test_plan_says_what_each_stages_gate_does(tmp_path, capsys):
    doc = job_doc(gate={"onRegression": "stop", "minGain": 0.01})
    doc["spec"]["stages"][1]["gate"] = {"metric": "val_loss", "minGain": 0.05, "relative": True, "onRegression": "fail"}
    doc["spec"]["stages"].append({"name": "all", "trainable": "all", "epochs": 1, "lr": 0.01})
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.strip() for line in out if line.strip().startswith("gate:")] == [
        "gate: val_loss worse than the stage before on the same validation images (paired z-test on per-image "
        "losses, p < 0.05), or a gain under 0.05 x the stage before's value -> fail the job",
        "gate: val_accuracy worse than the stage before on the same validation images (McNemar, p < 0.05), or a "
        "gain under 0.01 -> roll back and end the job (later stages skipped)",
    ]


def test_plan_warns_where_the_validation_set_is_too_small_for_the_gate(tmp_path, capsys):
    doc = job_doc()
    doc["spec"]["data"]["valPerClass"] = 5
    doc["spec"]["stages"][1]["gate"] = {"alpha": None}  # compares as measured: no test, no warning
    doc["spec"]["stages"].append({"name": "all", "trainable": "all", "epochs": 1, "lr": 0.01, "lrDecay": 2})
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "gate: val_accuracy worse than the stage before (as measured) -> roll back to the weights before it" in [
        line.strip() for line in out
    ]
    images = 5 * doc["spec"]["model"]["numClasses"]
    assert [line for line in out if line.startswith("warning")] == [
        f"warning: all: on {images} validation images the gate cannot see a drop of 5 points; raise "
        "spec.data.valPerClass"
    ]


def test_plan_expands_gradual(tmp_path, capsys):
    doc = with_path(
        job_doc(gradual={"stages": 3, "epochsPerStage": 1, "lr": 0.1, "lrFactor": 0.5, "lastAll": False, "lrDecay": 1}),
        "spec.stages",
        "DELETE",
    )
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[0] top1:" in out and "[1] top3:" in out and "[2] top5:" in out and "lr head=0.025" in out
    assert "[0] top1: 1 epochs, batch 32, cosine, trainable" in out  # the head-only stage: no warm-up
    assert "[1] top3: 1 epochs, batch 32, cosine after a 0.25-epoch warm-up," in out  # one rate: warm-up


def test_bad_spec_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_path(job_doc(), "spec.stages.0.epochs", 0)))
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == "error: spec.stages[0].epochs: must be greater than 0 (got 0)\n"


def test_a_failed_torchrun_worker_is_named_by_its_global_rank():
    """What the stage pod's launcher prints when a worker exits non-zero (a torchrun failure)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from trainer.launch import describe_failures

    failures = {3: ProcessFailure(1, 20, 137, "<N/A>"), 2: ProcessFailure(0, 19, 1, "<N/A>")}
    assert describe_failures(failures) == "rank 2: exit 1, rank 3: exit 137"
