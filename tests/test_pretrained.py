"""ImageNet weights and transfer learning: torchvision's layout, --pretrained, --init-from,
--freeze-backbone, --backbone-lr-scale, checkpoints from before the renaming.

    python -m pytest -q tests/test_pretrained.py

References: torchvision's own models (built with weights=None, their state_dicts written into a
temporary torch hub cache under the file names torchvision's weights enums expect), hand-written
maps to the old parameter names, tensors compared before and after training. No network.
"""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torchvision

from conftest import run_script

import checkpoint  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402

WITH_WEIGHTS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "alexnet",
                "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
                "googlenet"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchvision_model(name, **kw):
    if name == "googlenet":
        kw = {"aux_logits": True, "init_weights": True, **kw}
    return getattr(torchvision.models, name)(weights=None, **kw)


def ours_imagenet(name, num_classes=1000):
    """The issue's layout: ImageNet stem (VGG: paper head at 224), GoogLeNet 3x3 + aux heads."""
    extra = {"inception_kernel": 3, "aux_logits": True} if name == "googlenet" else {}
    stem = {} if name.startswith("vgg") else {"stem": "imagenet"}
    return models.build_model(name, num_classes, 3, 224, **stem, **extra)


def perturbed(state):
    """Random BatchNorm statistics and biases (weights=None leaves them 0/1/0): a test that maps a
    running_var or bias to the wrong layer must see different outputs."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, v in state.items():
        if k.endswith("running_var"):
            v = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith(("running_mean", "bias")) or (k.endswith("weight") and v.ndim == 1):
            v = torch.randn(v.shape, generator=g) * 0.1 + (1.0 if k.endswith("weight") else 0.0)
        out[k] = v
    return out


# --------------------------------------------------------------------------- torchvision's layout
@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_names_and_shapes_equal_torchvision_at_224(name):
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in ours_imagenet(name).state_dict().items()}
        ref = {k: tuple(v.shape) for k, v in torchvision_model(name).state_dict().items()}
    assert list(ours.items()) == list(ref.items())  # same names, shapes and order


@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_strict_load_and_equal_outputs(name):
    """torchvision's state_dict loads strictly and the eval-mode outputs are equal (64 px inputs:
    the same code path as 224 px with adaptive pooling, at 1/12 of the cost)."""
    torch.manual_seed(0)
    ref = torchvision_model(name).eval()
    state = perturbed(ref.state_dict())
    ref.load_state_dict(state)
    with torch.device("meta"):
        ours = ours_imagenet(name)
    ours.load_state_dict(state, strict=True, assign=True)
    ours.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert got.shape == (2, 1000)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_googlenet_mean_std_equal_torchvision_transform_input(hub):
    """torchvision runs its pretrained GoogLeNet with transform_input=True on ImageNet-normalized
    input; ours has no such layer and normalizes with the mean/std torchvision_weights records."""
    state, init = checkpoint.torchvision_weights("googlenet")
    ref = torchvision_model("googlenet", transform_input=True).eval()
    ref.load_state_dict(state)
    with torch.device("meta"):
        ours = ours_imagenet("googlenet")
    ours.load_state_dict(state, assign=True)
    ours.eval()
    pixels = torch.rand(2, 3, 64, 64)
    w = torchvision.models.GoogLeNet_Weights.DEFAULT.transforms()
    imagenet = (pixels - torch.tensor(w.mean).view(1, 3, 1, 1)) / torch.tensor(w.std).view(1, 3, 1, 1)
    recorded = (pixels - torch.tensor(init["mean"]).view(1, 3, 1, 1)) / torch.tensor(init["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(ours(recorded), ref(imagenet), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- the hub cache
def cache_file(name, weights="DEFAULT"):
    w = torchvision.models.get_model_weights(name)[weights]
    return w.url.rsplit("/", 1)[1]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A temporary TORCH_HOME whose hub cache holds resnet18's and googlenet's files, written
    from torchvision's weights=None models (what a download would put there, but random)."""
    home = tmp_path / "torch-home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    torch.manual_seed(1)
    for name in ("resnet18", "googlenet"):
        torch.save(perturbed(torchvision_model(name).state_dict()),
                   home / "hub" / "checkpoints" / cache_file(name))
    return home / "hub" / "checkpoints"


def test_torchvision_weights_from_the_cache(hub):
    state, init = checkpoint.torchvision_weights("resnet18", "IMAGENET1K_V1")
    file = torch.load(hub / cache_file("resnet18"), weights_only=True)
    assert state.keys() == file.keys() and all(torch.equal(state[k], file[k]) for k in file)
    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert init == {"source": "torchvision", "weights": "ResNet18_Weights.IMAGENET1K_V1",
                    "mean": list(w.transforms().mean), "std": list(w.transforms().std), "image_size": 224}
    # DEFAULT and the full enum name are the same weights
    assert checkpoint.pretrained_weights("resnet18", "ResNet18_Weights.IMAGENET1K_V1") is w
    assert checkpoint.pretrained_weights("resnet18", "DEFAULT") is w


def test_bad_weights_name():
    with pytest.raises(checkpoint.WeightsError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        checkpoint.pretrained_weights("resnet50", "IMAGENET21K")
    with pytest.raises(checkpoint.WeightsError, match="resnet18 has no weights 'ResNet50_Weights.IMAGENET1K_V2'"):
        checkpoint.pretrained_weights("resnet18", "ResNet50_Weights.IMAGENET1K_V2")


@pytest.mark.parametrize("name,options", [
    ("lenet5", {}), ("nin", {}), ("resnet20", {}), ("resnet18", {"plain": True}),
    ("googlenet", {"residual": "identity"}), ("googlenet", {"inception_kernel": 5}),
    ("resnet50", {"stem": "cifar"}), ("vgg16", {"head": "compact"}),
])
def test_models_without_weights_refused_with_the_list(name, options):
    published = [n for n in models.MODELS if n in torchvision.models.list_models(module=torchvision.models)]
    assert sorted(published) == sorted(WITH_WEIGHTS)
    with pytest.raises(checkpoint.WeightsError) as info:
        checkpoint.pretrained_options(name, options)
    msg = str(info.value)
    assert "\n" not in msg and all(n in msg for n in published)


def test_pretrained_options_fill_torchvision_layout():
    assert checkpoint.pretrained_options("resnet18", {"stem": "auto", "zero_init_residual": True}) == \
        {"stem": "imagenet", "zero_init_residual": True}
    assert checkpoint.pretrained_options("googlenet", {"aux_logits": True}) == \
        {"aux_logits": True, "stem": "imagenet", "inception_kernel": 3}
    assert checkpoint.pretrained_options("vgg11_bn", {}) == {"head": "paper"}


def test_alexnet_below_its_minimum_size_refused():
    with pytest.raises(checkpoint.WeightsError, match="at least 63 px.*--image-size 224"):
        checkpoint.torchvision_weights("alexnet", image_size=32)


def test_offline_error_line(tmp_path):
    """Neither cached nor downloadable: exit 1, one line naming the file and where to put it, and
    nothing written (no run dir, no partial file in the cache)."""
    home = tmp_path / "empty-home"
    out = tmp_path / "run"
    closed = "http://127.0.0.1:9"  # the discard port on loopback: refused at once, never the internet
    r = run_script("train.py", "--model", "resnet18", "--pretrained", "--dataset", "synthetic",
                   "--limit-train", "32", "--limit-test", "16", "--epochs", "1", "--out", out,
                   env={"TORCH_HOME": str(home), "https_proxy": closed, "HTTPS_PROXY": closed,
                        "http_proxy": closed, "HTTP_PROXY": closed, "no_proxy": "", "NO_PROXY": ""},
                   timeout=300)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    target = home / "hub" / "checkpoints" / cache_file("resnet18")
    assert f"put {cache_file('resnet18')}" in lines[0] and str(target) in lines[0]
    assert "$TORCH_HOME/hub/checkpoints/" in lines[0]
    assert not out.exists() and not [p for p in home.rglob("*") if p.is_file()]


# --------------------------------------------------------------------------- train.py end to end
def train_args(*extra):
    return train.parse_args(
        ["--dataset", "synthetic", "--limit-train", "32", "--limit-test", "16", "--epochs", "1",
         "--batch-size", "16", *map(str, extra)])


def test_pretrained_end_to_end_offline_one_channel(hub, tmp_path, capsys):
    """--pretrained --freeze-backbone on a 1-channel dataset, from the cache file alone: every
    backbone tensor of the run's checkpoint is the file's (conv1 summed over RGB), the head is
    new, the checkpoint records the weights and their mean/std (gray: the RGB average), and
    evaluate.py rebuilds the model and normalizes with them."""
    import data
    import evaluate as ev
    out = tmp_path / "run"
    train.main(train_args("--model", "resnet18", "--pretrained", "--channels", "1",
                          "--freeze-backbone", "--out", out))
    captured = capsys.readouterr()
    assert ("init from ResNet18_Weights.IMAGENET1K_V1: loaded 120 of 122 tensors; new head: fc; "
            "conv1.weight summed over RGB for 1 channel") in captured.out
    assert "warning:" in captured.err and "--image-size 224" in captured.err  # 32 px < 64 px
    ck = torch.load(out / "last.pt", weights_only=True)
    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    assert ck["init"]["weights"] == "ResNet18_Weights.IMAGENET1K_V1" and ck["init"]["source"] == "torchvision"
    assert ck["in_channels"] == 1 and ck["model_options"] == {"stem": "imagenet"}
    assert ck["mean"] == pytest.approx([sum(w.mean) / 3]) and ck["std"] == pytest.approx([sum(w.std) / 3])
    assert json.loads((out / "config.json").read_text())["mean"] == ck["mean"]
    file = torch.load(hub / cache_file("resnet18"), weights_only=True)
    for k, v in ck["model"].items():
        if k.startswith("fc."):
            assert v.shape[0] == 10
        elif k == "conv1.weight":
            torch.testing.assert_close(v, file[k].sum(1, keepdim=True), rtol=0, atol=0)
        else:
            assert torch.equal(v, file[k]), k
    # evaluate.py: the checkpoint alone rebuilds the model; its loss equals a pass normalized by hand
    ev.main(ev.get_args_parser().parse_args([str(out / "last.pt"), "--no-timing", "--out", str(tmp_path / "ev")]))
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    d = data.load_data("synthetic", ck["args"]["data_dir"], channels=1, limit_test=16)
    x = (d.test.images.float() / 255 - ck["mean"][0]) / ck["std"][0]
    model = checkpoint.model_from_checkpoint(ck)
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(x), d.test.labels).item()
    assert report["loss"] == pytest.approx(loss, rel=1e-4)


def test_one_channel_adaptation_equals_rgb_copy():
    """A gray image through the adapted 1-channel model gives the outputs of its RGB copy through
    the original (first conv summed over RGB), for the three stems that differ."""
    torch.manual_seed(0)
    for name in ("resnet18", "googlenet", "vgg11_bn"):
        rgb = ours_imagenet(name, 10)
        rgb.load_state_dict(perturbed(rgb.state_dict()))
        gray = models.build_model(name, 10, 1, 224, **checkpoint.pretrained_options(name, {"aux_logits": name == "googlenet" or None}))
        line = checkpoint.load_transfer(gray, rgb.state_dict(), new_head=False)
        assert "summed over RGB for 1 channel" in line and "mismatch" not in line
        x = torch.randn(2, 1, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(gray.eval()(x), rgb.eval()(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)


def init_state(name="resnet20", num_classes=10, seed=3):
    """A model's state with moved BatchNorm statistics, as a trained network has."""
    torch.manual_seed(seed)
    model = models.build_model(name, num_classes)
    return perturbed(model.state_dict())


def test_freeze_backbone_keeps_every_backbone_tensor(tmp_path):
    """After an epoch with --freeze-backbone: every backbone tensor, BatchNorm running statistics
    and counters included, equals the init file; the head has trained."""
    src = tmp_path / "init.pt"
    state = init_state()
    torch.save(state, src)
    out = tmp_path / "run"
    train.main(train_args("--model", "resnet20", "--init-from", src, "--freeze-backbone",
                          "--lr", "0.5", "--out", out))
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["init"] == {"source": str(src)}
    for k, v in ck["model"].items():
        if k.startswith("fc."):
            assert not torch.equal(v, state[k]), k  # the head loaded (same shape, --init-from) and trained
        else:
            assert torch.equal(v, state[k]), k
    # the optimizer holds the head only
    assert sum(len(g["params"]) for g in ck["optimizer"]["param_groups"]) == 2


def test_freeze_backbone_keeps_batchnorm_in_eval_mode_through_train_and_copies():
    model = models.build_model("resnet20", 10)
    assert checkpoint.freeze_backbone(model) == ["fc.weight", "fc.bias"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]

    def bn_modes(m):
        return {b.training for b in m.modules() if isinstance(b, nn.BatchNorm2d)}
    model.train()
    assert model.training and model.fc.training and bn_modes(model) == {False}
    ema = copy.deepcopy(model).eval()  # train.py's EMA copy: switching it leaves the model alone
    assert model.training and not ema.training
    assert bn_modes(copy.deepcopy(model).train()) == {False}
    assert model.state_dict().keys() == models.build_model("resnet20", 10).state_dict().keys()


def test_backbone_lr_scale_param_groups():
    model = models.build_model("resnet20", 10)
    opt = train.build_optimizer(model, torch.device("cpu"), lr=0.2, weight_decay=5e-4, backbone_lr_scale=0.1)
    head = {id(p) for p in model.fc.parameters()}
    lrs = {}
    for g in opt.param_groups:
        for p in g["params"]:
            lrs[id(p)] = g["lr"]
    assert len(lrs) == len(list(model.parameters()))  # every parameter once
    assert all(lr == pytest.approx(0.2 if pid in head else 0.02) for pid, lr in lrs.items())
    sched = train.Schedule(opt, "cosine", 2, 10)
    for _ in range(7):
        sched.step()
    ratios = {round(g["lr"] / base, 12) for g, base in zip(opt.param_groups, [0.2, 0.2, 0.02, 0.02])}
    assert len(ratios) == 1  # the schedule scales head and backbone alike


@pytest.mark.parametrize("flags,match", [
    (["--freeze-backbone"], "need --pretrained or --init-from"),
    (["--backbone-lr-scale", "0.1"], "need --pretrained or --init-from"),
    (["--pretrained", "--freeze-backbone", "--backbone-lr-scale", "0.1"], "no effect with --freeze-backbone"),
    (["--pretrained", "--plain"], "plain=True has no torchvision ImageNet weights"),
])
def test_transfer_flag_errors(flags, match):
    with pytest.raises(ValueError, match=match):
        train.main(train_args("--model", "resnet18", *flags))


@pytest.mark.parametrize("flags", [["--backbone-lr-scale", "0"], ["--backbone-lr-scale", "-1"],
                                   ["--pretrained", "--init-from", "x.pt"]])
def test_transfer_usage_errors_exit_2(flags):
    with pytest.raises(SystemExit) as info:
        train_args("--model", "resnet18", *flags)
    assert info.value.code == 2


def test_pretrained_refused_for_model_without_weights_before_any_work(tmp_path):
    with pytest.raises(checkpoint.WeightsError) as info:
        train.main(train_args("--model", "lenet5", "--pretrained", "--out", tmp_path / "run"))
    assert str(info.value).startswith("lenet5 has no torchvision ImageNet weights; --pretrained works with: alexnet")
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- --init-from
def test_load_transfer_summary_head_and_mismatches():
    src = init_state("resnet20", 10)
    # 100 classes: the head does not fit and is new; everything else loads
    model = models.build_model("resnet20", 100)
    line = checkpoint.load_transfer(model, src, new_head=False)
    assert line.startswith(f"loaded {len(src) - 2} of {len(src)} tensors; new head: fc")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.items() if not k.startswith("fc."))
    # a wider first conv than the model's: named as a shape mismatch, the rest loads
    bad = dict(src, **{"conv1.weight": torch.zeros(16, 3, 5, 5), "extra.weight": torch.zeros(1)})
    line = checkpoint.load_transfer(models.build_model("resnet20", 10), bad, new_head=False)
    assert "1 left at init (not in the weights)" not in line
    assert "1 shape mismatches: conv1.weight (16, 3, 5, 5) vs (16, 3, 3, 3)" in line
    assert "1 unused: extra.weight" in line
    # non-finite tensors (torchvision's vgg16 IMAGENET1K_FEATURES classifier) are not loaded
    nan = dict(src, **{"layer1.0.conv1.weight": torch.full_like(src["layer1.0.conv1.weight"], float("nan"))})
    assert "1 non-finite: layer1.0.conv1.weight" in checkpoint.load_transfer(models.build_model("resnet20", 10), nan)
    with pytest.raises(checkpoint.WeightsError, match="none of the given weights fit"):
        checkpoint.load_transfer(models.build_model("lenet5", 10), src)


def test_init_from_our_checkpoint_and_torchvision_state_dict(tmp_path):
    # one of our checkpoints (another dataset's head): its weights and its mean/std
    torch.manual_seed(0)
    src_model = models.build_model("resnet18", 7, 3, 224, stem="imagenet")
    ck = checkpoint.make_checkpoint(model_name="resnet18", model_options={"stem": "imagenet"}, num_classes=7,
                                    in_channels=3, image_size=224, model=src_model.state_dict(),
                                    mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6])
    path = tmp_path / "ours.pt"
    torch.save(ck, path)
    state, init = checkpoint.load_init(path)
    assert init == {"source": str(path), "model_name": "resnet18", "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    model = models.build_model("resnet18", 10, 3, 224, stem="imagenet")
    assert "new head: fc" in checkpoint.load_transfer(model, state, new_head=False)
    # torchvision's layout as a plain state_dict, with a DDP prefix
    tv = perturbed(torchvision_model("resnet18").state_dict())
    torch.save({"module." + k: v for k, v in tv.items()}, tmp_path / "tv.pth")
    state, init = checkpoint.load_init(tmp_path / "tv.pth")
    assert init == {"source": str(tmp_path / "tv.pth")} and state.keys() == tv.keys()
    model = models.build_model("resnet18", 10, 3, 224, stem="imagenet")
    line = checkpoint.load_transfer(model, state, new_head=False)
    assert line == "loaded 120 of 122 tensors; new head: fc"
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(checkpoint.CheckpointError, match="neither a deeper-networks checkpoint nor a state_dict"):
        checkpoint.load_init(tmp_path / "list.pt")
