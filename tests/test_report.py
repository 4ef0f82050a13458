"""Reports over runs: compare.py's grouped comparison (seeds pooled as mean +- std, checked
against numpy), the figures over runs (their plotted data checked against the runs' own
numbers), result files of the wrong shape, and studies/report.py, which writes the README's
study table from results/ (on fixture results here; the README itself is checked against the
repo's results/)."""
import csv
import importlib.util
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run_script

import checkpoint
import compare
import evaluate as ev
from data import load_data, make_loader
from models import build_model

SIZE, LIMIT_TEST = 16, 200  # lenet5 needs 16 px


def load_report_module():
    spec = importlib.util.spec_from_file_location("report", REPO / "studies" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


report = load_report_module()


# ----------------------------------------------------------------------------- fixtures

def history(top1, loss, seconds):
    return [{"epoch": i + 1, "lr": 0.1, "train_loss": l, "train_acc": 0.5, "test_loss": l + 0.1,
             "test_top1": t, "test_top5": min(1.0, t + 0.3), "epoch_seconds": s, "images_per_second": 100.0}
            for i, (t, l, s) in enumerate(zip(top1, loss, seconds))]


def make_run(root, name, model, seed, hist, metrics_csv=True, steps=0, **args):
    """A finished run as train.py leaves it: best.pt and metrics.csv. The weights: `seed`'s random
    init after `steps` Adam steps on the synthetic data (random inits all predict one class)."""
    d = root / name
    d.mkdir(parents=True)
    torch.manual_seed(seed)
    net = build_model(model, 10, 3, SIZE)
    if steps:
        data = load_data("synthetic", image_size=SIZE, limit_train=64)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        loader = make_loader(data.train, mean=data.mean, std=data.std, batch_size=32, train=True)
        batches = [b for _ in range(steps // len(loader) + 1) for b in loader][:steps]
        for x, y in batches:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    a = {"model": model, "dataset": "synthetic", "data_dir": str(d / "no-data"), "seed": seed,
         "limit_test": LIMIT_TEST, "limit_train": None, "val_split": 0.0, "epochs": len(hist),
         "batch_size": 32, "lr": 0.1, "out": str(d), "device": "cpu", "workers": 0, **args}
    ck = checkpoint.make_checkpoint(model_name=model, model_options={}, num_classes=10, in_channels=3,
                                    image_size=SIZE, classes=[f"class{i}" for i in range(10)],
                                    args=a, epoch=len(hist), model=net.state_dict(), history=hist)
    checkpoint.save(ck, d / "best.pt")
    if metrics_csv:
        compare.write_metrics(hist, d / "metrics.csv")
    return d / "best.pt"


HIST = {  # hand-made per-epoch rows: test top-1, training loss, epoch seconds
    "a-seed0": history([0.20, 0.40, 0.55], [2.0, 1.5, 1.1], [10.0, 12.0, 11.0]),
    "a-seed1": history([0.25, 0.35, 0.60], [2.1, 1.4, 1.0], [14.0, 9.0, 13.0]),
    "b": history([0.30, 0.50], [1.8, 1.2], [5.0, 6.0]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two seeds of lenet5, 6 steps each (the second without metrics.csv: its curves come from the
    checkpoint's history) and one resnet20, evaluated together by evaluate.py's CLI main (which
    returns the runs it compared)."""
    root = tmp_path_factory.mktemp("report")
    ckpts = [make_run(root, "a-seed0", "lenet5", 0, HIST["a-seed0"], steps=6),
             make_run(root, "a-seed1", "lenet5", 1, HIST["a-seed1"], metrics_csv=False, steps=6),
             make_run(root, "b", "resnet20", 0, HIST["b"])]
    out = root / "out"
    compared = ev.main(ev.get_args_parser().parse_args(
        [str(c) for c in ckpts] + ["--out", str(out), "--no-timing", "--device", "cpu", "--batch-size", "32"]))
    evals = {n: json.loads((out / n / "eval.json").read_text()) for n in HIST}
    return root, out, compared, evals


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- grouping and the table

def test_group_rules():
    base = {"model": "resnet20", "dataset": "cifar10", "lr": 0.1, "epochs": 3, "model_options": {}}
    runtime = {"out": "x", "resume": "x/last.pt", "device": "cuda", "workers": 8, "data_dir": "/d",
               "compile": True, "compile_mode": "max-autotune", "tensorboard": True, "channels_last": True,
               "deterministic": True, "world_size": 2, "torch": "9.9"}
    runs = [{"config": {**base, "seed": 0}},                   # 0 \
            {"config": {**base, "seed": 1, **runtime}},       # 1  > one group: only seed + runtime keys differ
            {"config": {**base, "seed": 2, "lr": 0.01}},      # 2: another lr
            {"config": {**base, "seed": 3, "epochs": 4}},     # 3: another budget
            {"config": {**base, "seed": 4, "model_options": {"plain": True}}},  # 4: another model
            {"config": {}},                                   # 5: no recorded args
            {"config": {**base, "seed": 2}}]                  # 6 joins 0 and 1
    got = [[runs.index(r) for r in g] for g in compare.group_runs(runs)]
    assert got == [[0, 1, 6], [2], [3], [4], [5]]
    same_seed = [{"config": {**base, "seed": 0}}, {"config": {**base, "seed": 0}}]  # best.pt + last.pt of one run
    assert len(compare.group_runs(same_seed)) == 2
    assert compare.group_label(["m-lr0.1-seed0/best.pt", "m-lr0.1-seed2/best.pt"], [0, 2]) == "m-lr0.1-seed{0,2}/best.pt"
    assert compare.group_label(["x/best.pt", "y/best.pt"], [0, 1]) == "x/best.pt + y/best.pt"
    m, s = compare.mean_std([0.1, 0.25, None, 0.4])
    assert (m, s) == (pytest.approx(np.mean([0.1, 0.25, 0.4])), pytest.approx(np.std([0.1, 0.25, 0.4], ddof=1)))
    assert compare.mean_std([0.3]) == (0.3, None) and compare.mean_std([None]) == (None, None)


def test_grouped_row_is_numpy_mean_and_std(runs):
    root, out, compared, evals = runs
    rows = read_csv(out / "comparison.csv")
    assert [r["run"] for r in rows] == ["a-seed{0,1}/best.pt", "b/best.pt"]
    assert [(r["n"], r["seeds"], r["model"]) for r in rows] == [("2", "0 1", "lenet5"), ("1", "0", "resnet20")]
    a, b = rows
    pair = [evals["a-seed0"], evals["a-seed1"]]
    assert np.std([e["top1"] for e in pair]) > 0  # two different nets: the std below is not trivially 0
    for k in ("top1", "top5", "loss", "train_seconds"):
        values = [e[k] for e in pair]
        assert float(a[k]) == pytest.approx(np.mean(values), rel=1e-12, abs=1e-15), k
        assert float(a[k + "_std"]) == pytest.approx(np.std(values, ddof=1), rel=1e-12, abs=1e-15), k
        assert float(b[k]) == evals["b"][k] and b[k + "_std"] == "", k
    assert [evals[n]["train_seconds"] for n in HIST] == [33.0, 36.0, 11.0]  # sum of the hand-made seconds
    assert int(a["params"]) == sum(p.numel() for p in build_model("lenet5", 10, 3, SIZE).parameters())

    per_run = read_csv(out / "comparison_runs.csv")
    assert [(r["run"], r["group"], r["seed"]) for r in per_run] == [
        ("a-seed0/best.pt", "a-seed{0,1}/best.pt", "0"), ("a-seed1/best.pt", "a-seed{0,1}/best.pt", "1"),
        ("b/best.pt", "b/best.pt", "0")]
    assert [float(r["top1"]) for r in per_run] == [evals[n]["top1"] for n in HIST]

    md = (out / "comparison.md").read_text()
    assert md.startswith("| run | model | dataset | n |") and md.count("\n|") == 3  # header, rule, 2 rows
    cell = f"{float(a['top1']):.2%}"[:-1] + " ± " + f"{float(a['top1_std']):.2%}"[:-1] + "%"
    assert cell in md.splitlines()[2] and f"{evals['b']['top1']:.2%}" in md.splitlines()[3]
    assert "ddof=1" in md and "--seed" in md and "data_dir" in md  # the footnote says how and what is ignored
    assert (out / "comparison_runs.md").read_text().count("\n|") == 4


def test_curves_plot_the_group_means(runs):
    from matplotlib.image import imread

    root, out, compared, evals = runs
    groups = compare.summarize_groups(compared)
    fig = compare.plot_runs_curves(groups)
    top1_epoch, loss_epoch, top1_time, loss_time = fig.axes[:4]
    a = {k: np.array([[h[k] for h in HIST[n]] for n in ("a-seed0", "a-seed1")])
         for k in ("test_top1", "train_loss", "epoch_seconds")}
    a_time = np.cumsum(a["epoch_seconds"], axis=1).mean(0)  # seconds: the runs are under 2 minutes
    b = {k: np.array([h[k] for h in HIST["b"]]) for k in ("test_top1", "train_loss", "epoch_seconds")}
    for ax, key, factor, xa, xb in ((top1_epoch, "test_top1", 100, [1, 2, 3], [1, 2]),
                                    (loss_epoch, "train_loss", 1, [1, 2, 3], [1, 2]),
                                    (top1_time, "test_top1", 100, a_time, np.cumsum(b["epoch_seconds"])),
                                    (loss_time, "train_loss", 1, a_time, np.cumsum(b["epoch_seconds"]))):
        lines = ax.get_lines()
        assert [ln.get_label() for ln in lines] == ["1  a-seed{0,1} (n=2)", "2  b"]
        np.testing.assert_allclose(lines[0].get_xdata(), xa)
        np.testing.assert_allclose(lines[0].get_ydata(), factor * a[key].mean(0))
        np.testing.assert_allclose(lines[1].get_xdata(), xb)
        np.testing.assert_allclose(lines[1].get_ydata(), factor * b[key])
        assert len(ax.collections) == 1  # one band: the group of two seeds, none for the single run
        band = ax.collections[0].get_paths()[0].vertices
        std = a[key].std(0, ddof=1)
        for x, m, s in zip(xa, a[key].mean(0), std):
            ys = band[np.isclose(band[:, 0], x), 1]
            assert np.isclose(ys.min(), factor * (m - s)) and np.isclose(ys.max(), factor * (m + s))
    assert lines[0].get_color() == top1_epoch.get_lines()[0].get_color() != lines[1].get_color()

    # the written file is this figure
    fig.savefig(root / "again.png", bbox_inches="tight")
    written = imread(out / "curves.png")
    assert written.shape == imread(root / "again.png").shape and written[..., :3].std() > 0.05


def test_tradeoff_plots_one_point_per_group(runs):
    from matplotlib.image import imread

    root, out, compared, evals = runs
    groups = compare.summarize_groups(compared)
    fig = compare.plot_tradeoff(groups)
    params, macs, latency = fig.axes[:3]
    top1 = [evals["a-seed0"]["top1"], evals["a-seed1"]["top1"]]
    # x is logarithmic past 20x: 62K vs 270K parameters stay linear, 0.2M vs 10M MACs do not
    for ax, key, scale in ((params, "params", "linear"), (macs, "macs", "log")):
        (pa, pb) = ax.get_lines()
        assert (pa.get_xdata()[0], pa.get_ydata()[0]) == (evals["a-seed0"][key], pytest.approx(100 * np.mean(top1)))
        assert (pb.get_xdata()[0], pb.get_ydata()[0]) == (evals["b"][key], pytest.approx(100 * evals["b"]["top1"]))
        assert ax.get_xscale() == scale
        assert [t.get_text() for t in ax.texts] == ["a-seed{0,1}", "b"]  # every point named
        (seg,) = ax.collections[0].get_segments()  # the error bar: mean +- std, for the group only
        np.testing.assert_allclose(seg[:, 1], 100 * (np.mean(top1) + np.array([-1, 1]) * np.std(top1, ddof=1)))
    assert evals["a-seed0"]["params"] != evals["b"]["params"] and np.std(top1) > 0
    assert latency.get_lines() == [] and "latency not measured" in latency.texts[0].get_text()  # --no-timing
    img = imread(out / "tradeoff.png")
    assert img.shape[1] > img.shape[0] > 300 and img[..., :3].std() > 0.05


def test_twenty_runs_stay_readable(tmp_path):
    """20 configurations (two with 3 seeds: 24 runs): 20 lines / points, 20 distinct colours, the
    legend outside the axes, latency plotted when measured, points numbered as in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rng = np.random.default_rng(0)
    runs = []
    for i in range(20):
        for seed in range(3 if i in (4, 11) else 1):
            top1 = np.sort(rng.uniform(0.1, 0.9, 6))
            runs.append({"label": f"cifar10-some-long-model-name-{i:02d}-seed{seed}/best.pt",
                         "config": {"model": f"m{i}", "seed": seed},
                         "report": {"top1": top1[-1], "top5": 1.0, "loss": 1 - top1[-1], "train_seconds": 600.0,
                                    "params": 1e5 * 1.5 ** i, "macs": 1e7 * (i + 1), "latency_ms_batch1": 0.5 + i,
                                    "images_per_second": 1e3},
                         "history": history(top1, 2 - top1, [100.0] * 6)})
    groups = compare.summarize_groups(runs)
    assert len(groups) == 20 and [g["n"] for g in groups if g["n"] > 1] == [3, 3]
    curves, tradeoff = compare.plot_runs_curves(groups, tmp_path / "c.png"), compare.plot_tradeoff(groups, tmp_path / "t.png")
    for fig, axes in ((curves, curves.axes[:4]), (tradeoff, tradeoff.axes[:3])):
        FigureCanvasAgg(fig).draw()
        for ax in axes:
            assert len(ax.get_lines()) == 20
            assert len({ln.get_color() for ln in ax.get_lines()}) == 20
        (legend,) = fig.legends
        assert len(legend.get_texts()) == 20 and legend.get_texts()[4].get_text().endswith("(n=3)")
        renderer = fig.canvas.get_renderer()
        assert legend.get_window_extent(renderer).x0 >= max(ax.get_window_extent(renderer).x1 for ax in axes)
    assert curves.axes[2].get_xlabel().startswith("training time (min")  # 10 min per run
    np.testing.assert_allclose(tradeoff.axes[2].get_lines()[3].get_xdata(), [3.5])  # latency of run 4
    assert [t.get_text() for t in tradeoff.axes[0].texts] == [str(i) for i in range(1, 21)]
    assert [ax.get_xscale() for ax in tradeoff.axes[:3]] == ["log", "linear", "log"]  # 1.5^19 = 2217x, 20x, 39x

    assert (tmp_path / "c.png").stat().st_size > 0 and (tmp_path / "t.png").stat().st_size > 0


def test_figures_never_replace_a_runs_own_curves(runs):
    """Comparing best.pt and last.pt of one run (its folder = the comparison folder): train.py's
    curves.png stays, the figures over runs get comparison_ names, and one seed is no group."""
    root = runs[0]
    d = root / "b"
    (d / "last.pt").write_bytes((d / "best.pt").read_bytes())
    own = b"train.py's curves.png"
    (d / "curves.png").write_bytes(own)
    ev.main(ev.get_args_parser().parse_args([str(d / "best.pt"), str(d / "last.pt"), "--no-timing", "--device", "cpu"]))
    assert (d / "curves.png").read_bytes() == own
    assert (d / "comparison_curves.png").is_file() and (d / "comparison_tradeoff.png").is_file()
    assert [r["n"] for r in read_csv(d / "comparison.csv")] == ["1", "1"]


# ----------------------------------------------------------------------------- studies/report.py

def ours_numbers_not_in_results(readme_text, results):
    """Every 'x' or 'x ± y' in the "ours" cells of the README's block, looked up in the results
    files: eval.json top-1 and comparison.csv top1 (+- top1_std) as % top-1 or % error. Returns
    the numbers found nowhere (a number typed by hand, or a table never regenerated)."""
    block = readme_text.split(report.BEGIN)[1].split(report.END)[0]
    cells = [ln.split("|")[4] for ln in block.splitlines() if ln.startswith("|") and not ln.startswith("|-")][1:]

    def pct(v):
        return f"{float(v) * 100:.2f}"

    known = set()
    for path in results.rglob("eval.json"):
        t = json.loads(path.read_text())["top1"]
        known |= {(pct(t), None), (pct(1 - t), None)}
    for path in results.rglob("comparison.csv"):
        for row in read_csv(path):
            s = pct(row["top1_std"]) if row.get("top1_std") else None
            t = float(row["top1"])
            known |= {(pct(t), s), (pct(1 - t), s)}
    numbers = [(m, s or None) for cell in cells for m, s in re.findall(r"(\d+\.\d+)(?: ± (\d+\.\d+))?", cell)]
    return [n for n in numbers if n not in known], numbers


def write_results(results, finished, diverged=(), study="depth_vs_lr", epochs=3, device="AMD EPYC (2 threads)",
                  **config):
    """Fixture run folders as the lead's runs leave them: config.json + eval.json (finished runs),
    config.json only and a diverged.txt line (diverged ones)."""
    root = results / study
    for name, top1 in {**finished, **dict.fromkeys(diverged)}.items():
        d = root / name
        d.mkdir(parents=True)
        seed = int(name.rsplit("seed", 1)[1]) if "-seed" in name else 0
        (d / "config.json").write_text(json.dumps({"model": name.split("-")[0], "epochs": epochs, "lr": 0.1,
                                                   "seed": seed, "out": str(d), "device": "cpu", **config}))
        if top1 is not None:
            (d / "eval.json").write_text(json.dumps({"top1": top1, "top5": 1.0, "loss": 0.5, "epoch": epochs,
                                                     "device": device, "device_type": "cpu"}))
        else:
            with open(root / "diverged.txt", "a") as f:
                f.write(name + "\n")
    return root


def fixture_results(tmp_path):
    results = tmp_path / "results"
    resnet = {f"mnist-resnet18-lr0.1-seed{s}": t for s, t in enumerate((0.9915, 0.9890, 0.9921))}
    root = write_results(results, resnet, diverged=[f"mnist-vgg16-lr0.1-seed{s}" for s in range(3)])
    write_results(results, {"resnet20": 0.8012, "plain20": 0.7788}, study="cifar_resnet_depth", epochs=20)
    # evaluate.py's comparison.csv for the MNIST study, written here with numpy (not the generator's code)
    values = np.array(list(resnet.values()))
    with open(root / "comparison.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["run", "n", "top1", "top1_std"])
        w.writeheader()
        w.writerow({"run": "mnist-resnet18-lr0.1-seed{0,1,2}/best.pt", "n": 3, "top1": values.mean(),
                    "top1_std": values.std(ddof=1)})
    return results, values


def test_report_fills_the_ours_cells(tmp_path):
    results, values = fixture_results(tmp_path)
    lines = report.block(results).splitlines()
    assert lines[2].split("|")[2].strip() == "VGG-16 at lr 0.1 / 0.01 / 0.001"
    assert sum(ln.startswith("|") for ln in lines) == len(report.TABLE) + 2
    mean, std = 100 * values.mean(), 100 * values.std(ddof=1)
    mnist_resnet = lines[3].split("|")[4].strip()
    assert mnist_resnet == f"{mean:.2f} ± {std:.2f} (n=3) / – / – % top-1 (2-thread CPU, 3 epochs)"
    assert lines[2].split("|")[4].strip() == "diverged (3 of 3) / – / – % top-1 (2-thread CPU, 3 epochs)"
    assert lines[8].split("|")[4].strip() == "19.88 / – / – / – / – % test error (2-thread CPU, 20 epochs)"
    assert lines[9].split("|")[4].strip() == "22.12 / – / – / – % test error (2-thread CPU, 20 epochs)"
    for i in (4, 5, 6, 7, 10):  # CIFAR depth vs lr, residual inception, architectures: nothing ran
        assert lines[i].split("|")[4].strip() == "not yet run", lines[i]
    assert "ddof=1" in report.block(results)


def test_report_writes_and_checks_the_readme(tmp_path, capsys):
    results, _ = fixture_results(tmp_path)
    readme = tmp_path / "README.md"
    before, after = "# title\n\nprose before\n\n", "\nprose after\n"
    readme.write_text(before + report.BEGIN + "\n| old | table |\n" + report.END + after)
    argv = ["--results", str(results), "--readme", str(readme)]
    parse = report.get_args_parser().parse_args
    assert report.main(parse(argv + ["--check"])) == 1 and "differs" in capsys.readouterr().err
    assert report.main(parse(argv + ["--write"])) == 0
    text = readme.read_text()
    assert text == before + report.BEGIN + "\n" + report.block(results) + report.END + after
    assert report.main(parse(argv + ["--check"])) == 0
    missing, numbers = ours_numbers_not_in_results(text, results)
    assert missing == [] and len(numbers) == 3  # the MNIST mean ± std, ResNet-20, plain-20

    readme.write_text(text.replace("19.88", "19.89"))  # a number typed by hand
    assert report.main(parse(argv + ["--check"])) == 1
    assert ours_numbers_not_in_results(readme.read_text(), results)[0] == [("19.89", None)]
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="results:begin"):
        report.main(parse(argv + ["--write"]))
    assert readme.read_text() == "no markers\n"


def test_report_refuses_to_pool_different_configurations(tmp_path):
    results = tmp_path / "results"
    write_results(results, {"mnist-resnet18-lr0.1-seed0": 0.99})
    write_results(results, {"mnist-resnet18-lr0.1-seed1": 0.98}, weight_decay=1e-4)
    with pytest.raises(ValueError, match="differ in: weight_decay"):
        report.block(results)
    p = report.get_args_parser().parse_args(["--results", str(results)])
    with pytest.raises(ValueError):
        report.main(p)


def test_compare_rebuilds_a_study_table_from_run_folders(tmp_path):
    """report.py --compare: evaluate.py's grouped table and figures from eval.json / config.json /
    metrics.csv alone (results/ keeps no checkpoints); diverged runs out; the old table's order."""
    study = tmp_path / "study"
    figures = {"a-seed0": (0.61, 0.90, 1.2, 100.0), "a-seed1": (0.66, 0.93, 1.1, 130.0),
               "a-seed2": (0.58, 0.88, 1.3, 90.0), "b": (0.40, 0.70, 1.9, 50.0)}
    for name, (top1, top5, loss, secs) in {**figures, "a-seed3": (0.1, 0.5, 2.3, 1.0)}.items():
        d = study / name
        d.mkdir(parents=True)
        seed = int(name[-1]) if "seed" in name else 0
        (d / "config.json").write_text(json.dumps({"model": name[0], "lr": 0.1, "seed": seed, "out": str(d),
                                                   "mean": [seed / 10], "data_dir": f"/data{seed}"}))
        (d / "eval.json").write_text(json.dumps({
            "checkpoint": f"/elsewhere/{name}/best.pt", "model": name[0], "dataset": "folder", "epoch": 2,
            "top1": top1, "top5": top5, "loss": loss, "train_seconds": secs, "params": 1000, "macs": 5000,
            "latency_ms_batch1": None, "images_per_second": None}))
        compare.write_metrics(history([top1 - 0.1, top1], [loss + 1, loss], [secs / 2] * 2), d / "metrics.csv")
    (study / "diverged.txt").write_text("a-seed3\n")
    with open(study / "comparison.csv", "w", newline="") as f:  # the old per-run table: b came first
        w = csv.writer(f)
        w.writerow(["run", "top1", "checkpoint"])
        w.writerows([["b/best.pt", 0.4, "/elsewhere/b/best.pt"]] +
                    [[f"a-seed{s}/best.pt", 0.6, f"/elsewhere/a-seed{s}/best.pt"] for s in range(3)])
    assert report.main(report.get_args_parser().parse_args(["--compare", str(study)])) == 0
    rows = read_csv(study / "comparison.csv")
    assert [(r["run"], r["n"]) for r in rows] == [("b/best.pt", "1"), ("a-seed{0,1,2}/best.pt", "3")]
    seeds = np.array([figures[f"a-seed{s}"] for s in range(3)])
    for j, k in enumerate(("top1", "top5", "loss", "train_seconds")):
        assert float(rows[1][k]) == pytest.approx(seeds[:, j].mean(), rel=1e-12)
        assert float(rows[1][k + "_std"]) == pytest.approx(seeds[:, j].std(ddof=1), rel=1e-12)
    assert len(read_csv(study / "comparison_runs.csv")) == 4  # the diverged run is left out
    for name in ("curves.png", "tradeoff.png"):
        assert (study / name).stat().st_size > 10_000
    with pytest.raises(ValueError, match="needs 2"):
        report.compare(study / "b")


GOOD_EVAL = {"checkpoint": "/elsewhere/best.pt", "model": "lenet5", "dataset": "mnist", "epoch": 2, "top1": 0.5,
             "top5": 0.9, "loss": 1.0, "train_seconds": 10.0, "params": 1000, "macs": 5000,
             "latency_ms_batch1": None, "images_per_second": None, "device": "CPU (2 threads)", "device_type": "cpu"}
BAD_FILES = [  # (file, its text, what the one line says; False: the README table does not read the file)
    ("eval.json", "[0.5]", "a JSON list, expected an object", True),
    ("eval.json", "{not json", "Expecting property name", True),
    ("eval.json", json.dumps({k: v for k, v in GOOD_EVAL.items() if k != "top1"}), "top1 is None", True),
    ("eval.json", json.dumps({**GOOD_EVAL, "top1": float("nan")}), "top1 is nan", True),
    ("eval.json", json.dumps({**GOOD_EVAL, "top1": "0.5"}), "top1 is '0.5'", True),
    ("eval.json", json.dumps({**GOOD_EVAL, "top1": 55.0}), "expected a fraction in [0, 1]", True),
    ("eval.json", json.dumps({**GOOD_EVAL, "params": "many"}), "params is 'many'", True),
    ("eval.json", json.dumps({**GOOD_EVAL, "device": 3}), "device is 3", True),
    ("metrics.csv", "epoch,test_top1\n1,0.5\n2,abc\n", "could not convert string to float: 'abc'", False),
    ("metrics.csv", "epoch,test_top1\n1,0.5,0.7\n", "more cells than columns", False),
    ("metrics.csv", "epoch,test_top1\ninf,0.5\n", "cannot convert float infinity", False),
    ("config.json", "[1, 2]", "a JSON list, expected an object", True),
]


@pytest.mark.parametrize("name,text,words,in_readme", BAD_FILES, ids=[f"{c[0]} {c[2][:30]}" for c in BAD_FILES])
def test_result_files_of_the_wrong_shape(tmp_path, name, text, words, in_readme):
    """A run whose eval.json / metrics.csv / config.json has the wrong shape: report.py --compare
    leaves it out with one warning line naming the file; the README table, which must not lose a
    run, stops with one error line naming it. Never a traceback."""
    study = tmp_path / "results" / "depth_vs_lr"
    for seed in range(3):
        d = study / f"mnist-resnet18-lr0.1-seed{seed}"
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({**GOOD_EVAL, "checkpoint": f"/elsewhere/{d.name}/best.pt"}))
        (d / "config.json").write_text(json.dumps({"model": "resnet18", "lr": 0.1, "epochs": 2, "seed": seed}))
        compare.write_metrics(history([0.3, 0.5], [1.5, 1.0], [5.0, 5.0]), d / "metrics.csv")
    bad = study / "mnist-resnet18-lr0.1-seed2" / name
    bad.write_text(text)
    r = run_script("studies/report.py", "--compare", study)
    assert r.returncode == 0 and r.stderr.startswith(f"warning: {bad}: ") and words in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "seed2" not in (study / "comparison_runs.csv").read_text()
    assert [row["n"] for row in read_csv(study / "comparison.csv")] == ["2"]  # the other two, pooled

    readme = tmp_path / "README.md"
    readme.write_text(f"{report.BEGIN}\n{report.END}\n")
    r = run_script("studies/report.py", "--results", study.parent, "--readme", readme, "--check")
    if in_readme:
        assert r.returncode == 1 and r.stderr.startswith(f"error: {bad}: ") and words in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1
    else:
        assert r.returncode == 1 and "differs" in r.stderr  # the table is read, and only the block is stale


def test_readme_table_is_what_results_holds():
    text = (REPO / "README.md").read_text()
    assert report.replace_block(text, report.block(REPO / "results")) == text, \
        "README's results block is stale: python studies/report.py --write"
    assert report.replace_block(text, report.seed_block(REPO / "results"), report.SEED_BEGIN, report.SEED_END) \
        == text, "README's seed table is stale: python studies/report.py --write"
    missing, _ = ours_numbers_not_in_results(text, REPO / "results")
    assert missing == [], f"README numbers not in results/: {missing}"


def test_seed_table_puts_ours_beside_the_seed_reports(tmp_path):
    """The seed report's table 1 as it printed it (rows: depth; columns: 20/50/100 epochs), ours
    beside theirs, our training time beside theirs; "–" where no run exists; figure from metrics.csv."""
    results = tmp_path / "results"
    write_results(results, {"resnet20": 0.8412, "resnet32": 0.85}, study="cifar_resnet_depth", epochs=20)
    write_results(results, {"resnet20": 0.9}, study="cifar_resnet_depth_50ep", epochs=50)
    ev = results / "cifar_resnet_depth" / "resnet20" / "eval.json"
    ev.write_text(json.dumps({**json.loads(ev.read_text()), "train_seconds": 2664.0}))
    rows = [ln.split("|")[1:-1] for ln in report.seed_block(results).splitlines() if ln.startswith("| ResNet")]
    assert [c.strip() for c in rows[0]] == ["ResNet-20", "15.88 / 19.33 (44.4 / 14.0 min)",
                                            "10.00 / 17.78 (– / 34.6 min)", "– / 10.04 (– / 68.5 min)"]
    assert [c.strip() for c in rows[1]] == ["ResNet-32", "15.00 / 19.85 (– min)", "– / 14.00", "– / 9.36"]
    assert [c.strip() for c in rows[2]][1:] == ["– / 18.56", "– / 16.26", "– / 9.66"]
    with pytest.raises(ValueError, match="not a 50-epoch run"):  # a run in the wrong folder
        write_results(results, {"resnet32": 0.9}, study="cifar_resnet_depth_50ep", epochs=20)
        report.seed_block(results)
    d = results / "cifar_resnet_depth" / "plain20"
    d.mkdir()
    compare.write_metrics([{"epoch": 1, "train_acc": 0.5, "test_top1": 0.4},
                           {"epoch": 2, "train_acc": 0.6, "test_top1": 0.55}], d / "metrics.csv")
    assert report.degradation(results).is_file()
