"""bench.py: the GPU speed benchmark must keep running on the CPU with tiny settings."""
import json

from conftest import run_script


def test_bench_cpu_tiny(tmp_path):
    out = tmp_path / "bench.json"
    r = run_script("bench.py", "--models", "lenet5", "resnet20", "--dataset", "synthetic",
                   "--steps", "3", "--warmup", "1", "--batch-size", "32",
                   "--baseline-batch-size", "32", "--no-compile", "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    fast = [row for row in res["rows"] if row["pipeline"] == "fast"]
    classic = [row for row in res["rows"] if row["pipeline"].startswith("classic")]
    assert [row["model"] for row in fast] == ["lenet5", "resnet20"]
    assert len(classic) == 1 and classic[0]["model"] == "lenet5"
    assert all(row["images_per_second"] > 0 for row in res["rows"])
    assert res["speedup_vs_classic"] == round(fast[0]["images_per_second"] / classic[0]["images_per_second"], 2)
    assert "| model | pipeline |" in r.stdout and res["torch"] in r.stdout
