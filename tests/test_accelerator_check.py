"""The accelerator check (experiments/accelerator_check.py) runs on the CPU, and its records
pass their own physical checks and verdicts."""

import json

import pytest

from experiments import accelerator_check


@pytest.mark.slow
def test_quick_accelerator_check_on_cpu(tmp_path):
    out = tmp_path / "check.jsonl"
    accelerator_check.main(["--quick", "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_check = {}
    for r in records:
        by_check.setdefault(r["check"], []).append(r)
    assert by_check["device"][0]["platform"] == "cpu"
    assert {r["dtype"] for r in by_check["matmul"]} == {"float32", "bfloat16"}
    steps = {(r["step"], r["dtype"]) for r in by_check["step"]}
    assert steps == {(s, "float32") for s in ("mlp", "contractive_best", "contractive_rev", "vae",
                                              "conv")} | {("mlp", "bfloat16")}
    for r in by_check["step"]:
        assert r["physical"] and r["gflop_per_step"] > 0, r
    # On the CPU the "device" run is the CPU run: the same program, the same numbers.
    for r in by_check["training"]:
        assert r["relative_difference"] == 0.0 and r["verdict"] == "agrees", r
    assert by_check["done"]
