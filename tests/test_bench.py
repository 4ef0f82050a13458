"""bench.py: the speed benchmark must keep running on the CPU with tiny settings."""
import json

import pytest

from conftest import run_script


def test_bench_cpu_tiny(tmp_path):
    out = tmp_path / "bench.json"
    r = run_script("bench.py", "--models", "lenet5", "--side-models", "resnet20", "--dataset", "synthetic",
                   "--configs", "eager", "channels_last", "bf16", "auto", "classic",
                   "--steps", "2", "--rounds", "2", "--warmup", "1", "--batch-size", "32", "--auto-steps", "10",
                   "--classic-batch-size", "32", "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    rows = {(row["model"], row["config"]): row for row in res["rows"]}
    # every configuration for --models, eager and auto for --side-models, classic for the first model
    assert set(rows) == {("lenet5", c) for c in ("eager", "channels_last", "bf16", "auto", "classic")} \
        | {("resnet20", "eager"), ("resnet20", "auto")}
    assert all(row["images_per_second"] > 0 and len(row["round_images_per_second"]) == 2 for row in rows.values())
    eager, auto = rows[("resnet20", "eager")], rows[("resnet20", "auto")]
    assert auto["vs_eager"] == pytest.approx(auto["images_per_second"] / eager["images_per_second"], abs=0.02)
    assert eager["vs_eager"] == 1.0 and eager["what"] == "fp32"
    # GFLOP/s from the counted MACs: training ~ 3 x forward, 2 FLOPs per MAC
    assert eager["gflops"] == pytest.approx(eager["images_per_second"] * 6 * eager["forward_macs"] / 1e9, rel=0.01, abs=0.1)
    assert eager["forward_macs"] > rows[("lenet5", "eager")]["forward_macs"] > 0
    assert rows[("lenet5", "bf16")]["what"] == "bf16" and rows[("lenet5", "channels_last")]["what"] == "fp32 + channels_last"
    assert [(rows[("lenet5", c)]["precision"], rows[("lenet5", c)]["layout"]) for c in ("eager", "channels_last")] == \
        [("fp32", "NCHW"), ("fp32", "channels_last")]
    assert all(row["peak_memory_gib"] is None for row in rows.values())  # CUDA only
    assert res["cpu"] and isinstance(res["cpu_flags"], list) and len(res["load_average_per_round"]) == 4
    assert res["side_models"] == ["resnet20"]
    assert "compile off (10 training steps" in res["auto"]  # --auto-steps: the run auto decides for
    assert "| model | config |" in r.stdout and res["torch"] in r.stdout
