"""Tests for models.py: every registered model, against independent references.

    python -m pytest -q tests/test_models.py

References are computed at test time (torchvision's models, built with weights=None) or are
published figures (ResNet paper Table 6 parameter counts, commonly cited MACs).
"""
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import checkpoint  # noqa: E402
import models  # noqa: E402

NAMES = list(models.MODELS)
RESNETS = [n for n in NAMES if n.startswith("resnet")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batch-2 passes gain nothing from intra-op threads, and on a 2-core machine shared with other
    test runs oversubscribed OpenMP threads spin: this file ran 3x slower with torch's default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def on_meta(fn):
    """Build (and run) on the meta device: shapes and parameter counts without memory or compute."""
    with torch.device("meta"):
        return fn()


def first_conv(model):
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


# --------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "alexnet",
                                  "vgg11", "vgg13", "vgg16", "vgg19",
                                  "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"])
def test_params_equal_torchvision_at_224(name):
    ours = on_meta(lambda: n_params(models.build_model(name, 1000, 3, 224)))
    ref = on_meta(lambda: n_params(getattr(torchvision.models, name)(weights=None)))
    assert ours == ref


@pytest.mark.parametrize("aux", [False, True])
def test_googlenet_params_equal_torchvision(aux):
    ours = on_meta(lambda: n_params(models.build_model("googlenet", 1000, 3, 224, inception_kernel=3,
                                                       aux_logits=aux)))
    ref = on_meta(lambda: n_params(torchvision.models.googlenet(weights=None, aux_logits=aux,
                                                                 init_weights=True)))
    assert ours == ref


def test_vgg_paper_head_equals_torchvision_at_small_size():
    ours = on_meta(lambda: n_params(models.build_model("vgg16_bn", 7, 3, 32, head="paper")))
    ref = on_meta(lambda: n_params(torchvision.models.vgg16_bn(weights=None, num_classes=7)))
    compact = on_meta(lambda: n_params(models.build_model("vgg16_bn", 7, 3, 32)))
    assert ours == ref and compact < ref / 5


# ResNet paper (He et al. 2015), Table 6
@pytest.mark.parametrize("name,millions", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66),
                                           ("resnet56", 0.85), ("resnet110", 1.7), ("resnet1202", 19.4)])
def test_cifar_resnet_params_match_paper(name, millions):
    count = on_meta(lambda: n_params(models.build_model(name, 10, 3, 32)))
    assert abs(count / 1e6 - millions) / millions < 0.02


@pytest.mark.parametrize("name", RESNETS)
def test_plain_twin_has_same_params(name):
    # ImageNet ResNets have projection shortcuts at every size; CIFAR ones are parameter-free
    residual = on_meta(lambda: n_params(models.build_model(name, 10, 3, 32)))
    plain = on_meta(lambda: n_params(models.build_model(name, 10, 3, 32, plain=True)))
    assert plain == residual


# --------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 32, 32)], ids=["1x28", "3x32"])
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name, shape):
    torch.manual_seed(0)
    model = models.build_model(name, 7, shape[1], shape[2]).train()
    x = torch.randn(shape, requires_grad=True)
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)
    F.cross_entropy(out, torch.tensor([0, 6])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in NAMES if n != "resnet1202"])  # resnet110: same code, 10x faster
def test_imagenet_size_shapes(name):
    def run():
        model = models.build_model(name, 1000, 3, 224).eval()
        return model(torch.zeros(1, 3, 224, 224)).shape
    assert on_meta(run) == (1, 1000)


@pytest.mark.parametrize("name", ["alexnet", "nin", "googlenet", "resnet18", "resnet50", "resnet20"])
def test_stems_auto_and_forced(name):
    def out_shape(size, **options):
        model = models.build_model(name, 5, 3, size, **options).eval()
        return model(torch.zeros(1, 3, size, size)).shape
    # auto: CIFAR stem (3x3 or 5x5 first conv at stride 1) up to 64 px, ImageNet stem above
    small = on_meta(lambda: first_conv(models.build_model(name, 5, 3, 64)))
    large = on_meta(lambda: first_conv(models.build_model(name, 5, 3, 65)))
    assert small.stride == (1, 1) and large.stride != (1, 1)
    # at 64 px: 32 px is too small for the ImageNet stem
    forced = on_meta(lambda: first_conv(models.build_model(name, 5, 3, 64, stem="imagenet")))
    assert forced.stride != (1, 1)
    assert on_meta(lambda: out_shape(224, stem="cifar")) == (1, 5)
    assert on_meta(lambda: out_shape(64, stem="imagenet")) == (1, 5)


# --------------------------------------------------------------------------- GoogLeNet
def test_googlenet_aux_heads_in_train_mode_only():
    torch.manual_seed(0)
    model = models.build_model("googlenet", 7, 3, 32, aux_logits=True).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, tuple) and len(out) == 3 and all(o.shape == (2, 7) for o in out)
    y = torch.tensor([1, 2])
    (F.cross_entropy(out[0], y) + 0.3 * (F.cross_entropy(out[1], y) + F.cross_entropy(out[2], y))).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert isinstance(model(torch.randn(2, 3, 32, 32)), torch.Tensor)


def inception_kernels(model):
    return {m.kernel_size for block in model.modules() if isinstance(block, models.Inception)
            for m in block.modules() if isinstance(m, nn.Conv2d)}


def test_inception_kernel():
    paper = on_meta(lambda: inception_kernels(models.build_model("googlenet", 10)))
    assert paper == {(1, 1), (3, 3), (5, 5)}
    default = on_meta(lambda: models.build_model("googlenet", 10))
    explicit = on_meta(lambda: models.build_model("googlenet", 10, inception_kernel=5))
    assert n_params(default) == n_params(explicit)
    tv_like = on_meta(lambda: inception_kernels(models.build_model("googlenet", 10, inception_kernel=3)))
    assert tv_like == {(1, 1), (3, 3)}


def inception_shapes(model, x):
    """(input shape, output shape, has shortcut) of every Inception module in a forward pass."""
    seen = []
    def record(module, inputs, output):
        seen.append((inputs[0].shape, output.shape, module.shortcut is not None))
    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, models.Inception)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_googlenet_residual_variants():
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    base = models.build_model("googlenet", 10).eval()
    identity = models.build_model("googlenet", 10, residual="identity").eval()
    identity.load_state_dict(base.state_dict())  # strict: an identity shortcut has no weights
    shapes = inception_shapes(identity, x)
    assert len(shapes) == 9 and any(s[2] for s in shapes)
    assert all(has_shortcut == (cin == cout) for cin, cout, has_shortcut in shapes)
    projection = models.build_model("googlenet", 10, residual="projection").eval()
    missing, unexpected = projection.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all("shortcut" in k for k in missing)
    assert all(s[2] for s in inception_shapes(projection, x))
    with torch.no_grad():
        ref = base(x)
        assert not torch.allclose(identity(x), ref) and not torch.allclose(projection(x), ref)
    assert models.build_model("googlenet", 10, residual=True).inception4b.shortcut is not None


# --------------------------------------------------------------------------- ResNet
@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_plain_changes_forward_with_same_weights(name):
    torch.manual_seed(0)
    residual = models.build_model(name, 10).eval()
    plain = models.build_model(name, 10, plain=True).eval()
    plain.load_state_dict(residual.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(plain(x), residual(x))


def test_bottleneck_stride_on_3x3():
    model = on_meta(lambda: models.build_model("resnet50", 1000, 3, 224))
    strided = [m.kernel_size for layer in model.stages() for m in layer.modules()
               if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert strided.count((3, 3)) == 3 and strided.count((1, 1)) == 3  # 3 downsampling blocks + projections


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_zero_init_residual_makes_branches_start_silent(name):
    x = torch.randn(2, 3, 32, 32)

    def outputs(zero_init):
        torch.manual_seed(0)
        model = models.build_model(name, 10, zero_init_residual=zero_init).eval()
        with torch.no_grad():
            before = model(x)
            for block in model.modules():
                if isinstance(block, models.Block):
                    block.conv1.weight.add_(torch.randn_like(block.conv1.weight))
            return before, model(x)

    before, after = outputs(True)
    assert torch.allclose(before, after)  # residual branches contribute nothing at init
    before, after = outputs(False)
    assert not torch.allclose(before, after)


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize("name,drop", [("alexnet", 0.2), ("vgg11", 0.3), ("nin", 0.1), ("googlenet", 0.25)])
def test_dropout_option(name, drop):
    model = on_meta(lambda: models.build_model(name, 10, dropout=drop))
    rates = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    assert drop in rates and rates <= {drop, 0.7}  # 0.7: GoogLeNet's aux heads (off here)


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="resnet18.*resnet20"):
        models.build_model("resnet19", 10)


@pytest.mark.parametrize("name,options,match", [
    ("resnet18", {"aux_logits": True}, "aux_logits.*plain, stem, zero_init_residual"),
    ("vgg16", {"plain": True}, "plain.*head, dropout"),
    ("googlenet", {"dropout": 0.1, "plain": True}, "plain.*aux_logits, inception_kernel, residual"),
    ("lenet5", {"dropout": 0.5}, "takes no options"),
    ("resnet20", {"dropout": 0.5}, "dropout"),
])
def test_option_not_taken_names_allowed(name, options, match):
    with pytest.raises(ValueError, match=match):
        models.build_model(name, 10, **options)


@pytest.mark.parametrize("name,options", [
    ("resnet20", {"stem": "huge"}), ("googlenet", {"inception_kernel": 7}),
    ("googlenet", {"residual": "dense"}), ("vgg11", {"head": "big"}), ("alexnet", {"dropout": 1.5}),
    ("resnet20", {"plain": True, "zero_init_residual": True}),
])
def test_bad_option_values(name, options):
    with pytest.raises(ValueError):
        models.build_model(name, 10, **options)


def test_bad_sizes():
    for kwargs in ({"num_classes": 0}, {"num_classes": 10, "in_channels": 0},
                   {"num_classes": 10, "image_size": -1}, {"num_classes": 2.5}):
        with pytest.raises(ValueError):
            models.build_model("resnet20", **kwargs)


def test_none_options_are_not_given():
    model = models.build_model("resnet20", 10, aux_logits=None, plain=None, residual=None, dropout=None)
    assert n_params(model) == n_params(models.build_model("resnet20", 10))
    assert models.model_options("lenet5") == ()


# --------------------------------------------------------------------------- MACs
@pytest.mark.parametrize("name,size,macs", [("resnet18", 224, 1.82e9), ("resnet50", 224, 4.1e9),
                                            ("resnet20", 32, 40.8e6), ("resnet56", 32, 125.8e6)])
def test_macs_match_published(name, size, macs):
    model = models.build_model(name, 1000 if size == 224 else 10, 3, size).train()
    counted = models.count_macs(model, (1, 3, size, size))
    assert abs(counted - macs) / macs < 0.03
    assert model.training  # count_macs restores the mode


def test_count_macs_linear_by_hand():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    assert models.count_macs(model, (1, 3, 2, 2)) == 12 * 5
    assert models.count_macs(model, (3, 2, 2)) == 12 * 5


# --------------------------------------------------------------------------- checkpoints
class Payload:
    """Unpickling this would create a file: the weights_only loader must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def make_checkpoint(model, name, options, **extra):
    return checkpoint.make_checkpoint(model_name=name, model_options=options, num_classes=10, in_channels=3,
                                      image_size=32, model=model.state_dict(), **extra)


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint not found"):
        checkpoint.load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"PK\x03\x04" + os.urandom(100)],
                         ids=["random", "empty", "broken-zip"])
def test_load_checkpoint_corrupt(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match="cannot read checkpoint") as info:
        checkpoint.load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_load_checkpoint_directory(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="cannot read checkpoint"):
        checkpoint.load_checkpoint(tmp_path)


def test_load_checkpoint_refuses_pickled_code(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "model": {}, "x": Payload(str(marker))}, path)
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load") as info:
        checkpoint.load_checkpoint(path)
    assert not marker.exists()
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_load_checkpoint_missing_keys(tmp_path):
    path = tmp_path / "partial.pt"
    torch.save({"format": checkpoint.FORMAT, "model": {}}, path)
    missing = r"not a deeper-networks checkpoint \(missing: model_name,"
    with pytest.raises(checkpoint.CheckpointError, match=missing):
        checkpoint.load_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(checkpoint.CheckpointError, match="not a deeper-networks checkpoint"):
        checkpoint.load_checkpoint(path)


def test_model_from_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = models.build_model("resnet20", 10, plain=True)
    model(torch.randn(4, 3, 32, 32))  # train mode: move the BatchNorm running statistics
    ema = models.build_model("resnet20", 10, plain=True)
    path = tmp_path / "ck.pt"
    torch.save(make_checkpoint(model, "resnet20", {"plain": True}, ema=ema.state_dict()), path)
    ck = checkpoint.load_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        loaded = checkpoint.model_from_checkpoint(ck)
        assert not loaded.training and torch.equal(loaded(x), model.eval()(x))
        assert torch.equal(checkpoint.model_from_checkpoint(ck, ema=True)(x), ema.eval()(x))
        ck["ema"] = None  # ema asked for but absent: the model's own weights
        assert torch.equal(checkpoint.model_from_checkpoint(ck, ema=True)(x), model(x))


def test_model_from_checkpoint_mismatched_weights():
    ck = make_checkpoint(models.build_model("resnet20", 10), "resnet32", {})
    with pytest.raises(checkpoint.CheckpointError, match="do not fit resnet32"):
        checkpoint.model_from_checkpoint(ck)


# --------------------------------------------------------------------------- CLI table
def test_table(capsys):
    args = models.get_args_parser().parse_args(["lenet5", "resnet20", "--image-size", "28",
                                                "--in-channels", "1"])
    models.main(args)
    out = capsys.readouterr().out
    assert "lenet5" in out and "resnet20" in out and "0.27M" in out
    with pytest.raises(SystemExit) as e:  # refused by the parser: a usage error, exit 2
        models.get_args_parser().parse_args(["resnet19"])
    assert e.value.code == 2 and "unknown model" in capsys.readouterr().err
