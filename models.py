"""Every architecture, the MODELS registry and build_model().

    python models.py                                   # params + MACs of every model at 3x32x32
    python models.py resnet50 vgg16 --image-size 224 --num-classes 1000

lenet5 (LeCun 1998), alexnet (Krizhevsky 2012, single tower), nin (Lin 2013), vgg11-19 (+ _bn;
Simonyan & Zisserman 2014), googlenet (Szegedy 2014, with BatchNorm), resnet18-152 (He 2015, v1.5)
and resnet20-1202 (He 2015, CIFAR 6n+2). Parameter names are torchvision's, so its ImageNet weights
load as they are (checkpoint.torchvision_weights).
"""
import argparse
import sys
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


def _choice(option, value, choices):
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(map(str, choices))} (got {value!r})")
    return value


def _auto(option, value, image_size, small="cifar", large="imagenet"):
    """'auto' -> `small` (a stem without early downsampling, a compact head) up to 64 px, `large` above."""
    if _choice(option, value, ("auto", small, large)) == "auto":
        return small if image_size <= 64 else large
    return value


def _dropout(p):  # nn.Dropout(p), p checked
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"dropout must be a number in [0, 1) (got {p!r})")
    return nn.Dropout(float(p))


def _init_weights(model, conv_mode="fan_out", linear_std=0.01):
    """Kaiming-normal convs (He et al. 2015, as torchvision), Linear ~ N(0, linear_std) as its VGG
    (None keeps PyTorch's default, as its ResNet); BatchNorm keeps PyTorch's identity init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=conv_mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)


def _conv_bn(cin, cout, kernel, stride=1, eps=1e-5):
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout, eps=eps)]


class LeNet5(nn.Module):
    """conv5(6) - pool - conv5(16) - pool - fc120 - fc84 - fc(num_classes)."""

    OPTIONS = ()
    MIN_SIZE = 12  # 2 x 2 px left after the second pool (28 px digits: 5 x 5)

    def __init__(self, num_classes, in_channels=3, image_size=32):
        super().__init__()
        pad = 2 if image_size < 32 else 0  # LeCun centred the 28x28 digits in a 32x32 field
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, 1, pad), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # N x 6 x 14 x 14
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # N x 16 x 5 x 5
            nn.AdaptiveAvgPool2d(5),  # a no-op at 28 and 32 px; keeps fc1 at 400 inputs elsewhere
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Linear(84, num_classes))
        _init_weights(self, "fan_in", None)

    def forward(self, x):
        return self.classifier(self.features(x))


class AlexNet(nn.Module):
    """torchvision's single-tower AlexNet. The CIFAR stem swaps conv 11x11/4 + max-pool for a
    3x3/1 conv, so 32 px inputs reach the 6x6 pool at 7x7 (224 px inputs: 6x6)."""

    OPTIONS = ("stem", "dropout")
    MIN_SIZE = {"cifar": 7, "imagenet": 63}  # per stem: 1 x 1 px left after the last pool

    def __init__(self, num_classes, in_channels=3, image_size=32, stem="auto", dropout=0.5):
        super().__init__()
        if _auto("stem", stem, image_size) == "imagenet":
            first = [nn.Conv2d(in_channels, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2)]
        else:
            first = [nn.Conv2d(in_channels, 64, 3, 1, 1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(
            *first,  # N x 64 x 27 x 27 at 224 (imagenet stem), N x 64 x 32 x 32 at 32 (cifar stem)
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        )  # N x 256 x 6 x 6 at 224, N x 256 x 7 x 7 at 32
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            _dropout(dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            _dropout(dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes))
        _init_weights(self, "fan_in")  # no BatchNorm: keep forward activations at unit scale

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# Network in Network: an mlpconv block = a k x k conv and two 1x1 convs (an MLP slid over the
# image), all ReLU: (width, kernel, stride, padding, (1x1 width, 1x1 width)); None = num_classes:
# the last block emits one map per class, averaged globally (no FC). "M"/"A" = 3x3/2 max/avg pool,
# "D" = dropout. cifar: the authors' CIFAR-10 model; imagenet: their 4-block ImageNet model.
NIN = {
    "cifar": [(192, 5, 1, 2, (160, 96)), "M", "D", (192, 5, 1, 2, (192, 192)), "A", "D",
              (192, 3, 1, 1, (192, None))],
    "imagenet": [(96, 11, 4, 0, (96, 96)), "M", (256, 5, 1, 2, (256, 256)), "M",
                 (384, 3, 1, 1, (384, 384)), "M", "D", (1024, 3, 1, 1, (1024, None))],
}


class NiN(nn.Module):
    OPTIONS = ("stem", "dropout")
    MIN_SIZE = {"cifar": 4, "imagenet": 39}

    def __init__(self, num_classes, in_channels=3, image_size=32, stem="auto", dropout=0.5):
        super().__init__()
        layers, c = [], in_channels
        for item in NIN[_auto("stem", stem, image_size)]:
            if item in ("M", "A"):  # ceil_mode as in Caffe: 28 px -> 14 -> 7, 32 px -> 16 -> 8
                pool = nn.MaxPool2d if item == "M" else nn.AvgPool2d
                layers.append(pool(3, 2, ceil_mode=True))
            elif item == "D":
                layers.append(_dropout(dropout))
            else:
                width, k, s, p, (m1, m2) = item
                m2 = m2 or num_classes
                layers += [nn.Conv2d(c, width, k, s, p), nn.ReLU(inplace=True),
                           nn.Conv2d(width, m1, 1), nn.ReLU(inplace=True),
                           nn.Conv2d(m1, m2, 1), nn.ReLU(inplace=True)]
                c = m2
        layers.pop()  # no ReLU on the class maps: logits must be free to go negative
        self.features = nn.Sequential(*layers)  # N x num_classes x 8 x 8 at 32, x 6 x 6 at 224
        self.pool = nn.AdaptiveAvgPool2d(1)
        _init_weights(self, "fan_in")  # no BatchNorm: keep forward activations at unit scale

    def forward(self, x):
        return torch.flatten(self.pool(self.features(x)), 1)


# VGG configurations A, B, D, E (Simonyan & Zisserman 2014, Table 1): 3x3 conv widths, "M" = 2x2 pool.
VGGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """head='paper': 7x7 pool + FC 4096-4096 with dropout (torchvision); 'compact': global pool +
    FC 512 with dropout (the usual CIFAR head); 'auto': compact up to 64 px, paper above."""

    OPTIONS = ("head", "dropout")

    def __init__(self, depth, batch_norm, num_classes, in_channels=3, image_size=32, head="auto",
                 dropout=0.5):
        super().__init__()
        layers, c = [], in_channels
        for v in VGGS[depth]:
            if v == "M":  # ceil_mode: same shapes at 224 and 32 px, and 28 px ends at 1x1, not 0x0
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:  # the conv keeps its bias before BN, as torchvision's (equal parameter counts)
                bn = [nn.BatchNorm2d(v)] if batch_norm else []
                layers += [nn.Conv2d(c, v, 3, padding=1), *bn, nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)  # N x 512 x 7 x 7 at 224, N x 512 x 1 x 1 at 32
        head = _auto("head", head, image_size, "compact", "paper")
        pool, hidden = (7, 4096) if head == "paper" else (1, 512)
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        fcs = [nn.Linear(512 * pool * pool, hidden), nn.ReLU(inplace=True), _dropout(dropout)]
        if head == "paper":
            fcs += [nn.Linear(hidden, hidden), nn.ReLU(inplace=True), _dropout(dropout)]
        self.classifier = nn.Sequential(*fcs, nn.Linear(hidden, num_classes))
        _init_weights(self)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# GoogLeNet's Inception modules (Szegedy et al. 2014, Table 1):
# (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj); output channels = 1x1 + 3x3 + 5x5 + pool proj.
INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128), "5b": (384, 192, 384, 48, 128, 128),
}


class BasicConv2d(nn.Module):
    """torchvision GoogLeNet's conv + BatchNorm (eps 1e-3) + ReLU, with its names (conv, bn)."""

    def __init__(self, cin, cout, kernel, stride=1):
        super().__init__()
        self.conv, self.bn = _conv_bn(cin, cout, kernel, stride, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """Four branches concatenated (torchvision's branch1..4); kernel: the '5x5' branch's (5 = paper,
    3 = torchvision, pytorch/vision#906). residual: 'identity' adds x where the shapes match;
    'projection' everywhere, by a 1x1 conv + BN where the channels change."""

    def __init__(self, cin, c1, c3r, c3, c5r, c5, cp, kernel=5, residual=None):
        super().__init__()
        self.branch1 = BasicConv2d(cin, c1, 1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, c3r, 1), BasicConv2d(c3r, c3, 3))
        self.branch3 = nn.Sequential(BasicConv2d(cin, c5r, 1), BasicConv2d(c5r, c5, kernel))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), BasicConv2d(cin, cp, 1))
        cout = c1 + c3 + c5 + cp
        self.shortcut = None
        if residual is not None and cin == cout:
            self.shortcut = nn.Identity()
        elif residual == "projection":
            self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1))

    def forward(self, x):
        out = torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)
        if self.shortcut is not None:
            out = F.relu(out + self.shortcut(x))
        return out


class InceptionAux(nn.Module):
    """Auxiliary classifier (torchvision's): 4x4 avg pool, 1x1 conv 128, FC 1024, dropout 0.7."""

    def __init__(self, cin, num_classes):
        super().__init__()
        self.conv = BasicConv2d(cin, 128, 1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(0.7)

    def forward(self, x):
        x = torch.flatten(self.conv(F.adaptive_avg_pool2d(x, 4)), 1)  # N x 2048
        return self.fc2(self.dropout(F.relu(self.fc1(x), inplace=True)))


class GoogLeNet(nn.Module):
    """torchvision's names (conv1..3, inception3a..5b, aux1/aux2, fc). Train mode with aux_logits
    returns (logits, aux1, aux2), aux after 4a and 4d (train.py weights them 0.3); otherwise
    logits. The CIFAR stem drops the two early downsamplings (maxpool1/2 become identities)."""

    OPTIONS = ("aux_logits", "inception_kernel", "residual", "stem", "dropout")
    MIN_SIZE = {"cifar": 2, "imagenet": 15}

    def __init__(self, num_classes, in_channels=3, image_size=32, aux_logits=False,
                 inception_kernel=5, residual=None, stem="auto", dropout=0.4):
        super().__init__()
        kernel = int(_choice("inception_kernel", inception_kernel, (3, 5)))
        residual = {True: "identity", False: None}.get(residual, residual)  # --residual w/o value
        _choice("residual", residual, (None, "identity", "projection"))
        big = _auto("stem", stem, image_size) == "imagenet"  # N x 192 x 28 x 28 at 224; 32 x 32 at 32
        self.conv1 = BasicConv2d(in_channels, 64, 7 if big else 3, 2 if big else 1)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True) if big else nn.Identity()
        self.conv2 = BasicConv2d(64, 64, 1)
        self.conv3 = BasicConv2d(64, 192, 3)
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True) if big else nn.Identity()
        cin = 192
        for name, cfg in INCEPTION.items():
            setattr(self, f"inception{name}", Inception(cin, *cfg, kernel=kernel, residual=residual))
            cin = cfg[0] + cfg[2] + cfg[4] + cfg[5]
            if name == "3b":
                self.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
            elif name == "4e":
                self.maxpool4 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.aux1 = InceptionAux(512, num_classes) if aux_logits else None
        self.aux2 = InceptionAux(528, num_classes) if aux_logits else None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = _dropout(dropout)
        self.fc = nn.Linear(1024, num_classes)
        _init_weights(self)

    def forward(self, x):
        x = self.maxpool2(self.conv3(self.conv2(self.maxpool1(self.conv1(x)))))
        x = self.inception3b(self.inception3a(x))  # N x 480 x 28 x 28 at 224, N x 480 x 32 x 32 at 32
        x = self.inception4a(self.maxpool3(x))  # N x 512 x 14 x 14 at 224, N x 512 x 16 x 16 at 32
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))  # N x 528 x 14 x 14
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.inception4e(x)  # N x 832 x 14 x 14
        x = self.inception5b(self.inception5a(self.maxpool4(x)))  # N x 1024 x 7 x 7 at 224, x 8 x 8 at 32
        logits = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        return (logits, aux1, aux2) if aux1 is not None else logits


# ResNet depth: (block, blocks per stage, stage widths, shortcut where the shape changes).
# "B" = 1x1 conv + BN projection (torchvision), "A" = parameter-free subsample + zero-pad
# (the paper's CIFAR nets). CIFAR ResNets: 6n+2 layers, n blocks per stage.
RESNETS = {
    18: ("basic", (2, 2, 2, 2), (64, 128, 256, 512), "B"),
    34: ("basic", (3, 4, 6, 3), (64, 128, 256, 512), "B"),
    50: ("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), "B"),
    101: ("bottleneck", (3, 4, 23, 3), (64, 128, 256, 512), "B"),
    152: ("bottleneck", (3, 8, 36, 3), (64, 128, 256, 512), "B"),
    **{6 * n + 2: ("basic", (n, n, n), (16, 32, 64), "A") for n in (3, 5, 7, 9, 18, 200)},
}


class PadShortcut(nn.Module):
    """Option A of the ResNet paper: subsample by the stride, zero-pad the new channels."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.extra, self.stride = cout - cin, stride

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class Block(nn.Module):
    """relu(residual(x) + shortcut(x)), torchvision's names: basic = 3x3 conv1 - 3x3 conv2; bottleneck
    = 1x1 conv1 - 3x3 conv2 (strided: v1.5) - 1x1 conv3 (x4 wide); `downsample` = the shortcut where
    the shape changes (None: identity). plain=True: the same layers without the addition."""

    def __init__(self, kind, cin, width, stride, shortcut="B", plain=False):
        super().__init__()
        self.bottleneck = kind == "bottleneck"
        cout = 4 * width if self.bottleneck else width
        if self.bottleneck:
            self.conv1, self.bn1 = _conv_bn(cin, width, 1)
            self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
            self.conv3, self.bn3 = _conv_bn(width, cout, 1)
        else:
            self.conv1, self.bn1 = _conv_bn(cin, width, 3, stride)
            self.conv2, self.bn2 = _conv_bn(width, cout, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = (PadShortcut(cin, cout, stride) if shortcut == "A"
                               else nn.Sequential(*_conv_bn(cin, cout, 1, stride)))
        # A plain block keeps its (unused) projection: the twins have equal parameter counts; with
        # no gradient there, DDP needs find_unused_parameters=True for plain ImageNet ResNets.
        self.plain = plain

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.bottleneck:
            out = self.bn3(self.conv3(self.relu(out)))
        if not self.plain:
            out = out + (x if self.downsample is None else self.downsample(x))
        return F.relu(out)


class ResNet(nn.Module):
    """torchvision's names: conv1, bn1, relu, maxpool, layer1..layer4 (CIFAR: layer1..layer3),
    avgpool, fc. The CIFAR stem is a 3x3 stride-1 conv1 and no max-pool (maxpool = identity)."""

    OPTIONS = ("plain", "stem", "zero_init_residual")

    def __init__(self, depth, num_classes, in_channels=3, image_size=32, plain=False, stem="auto",
                 zero_init_residual=False):
        super().__init__()
        if plain and zero_init_residual:
            raise ValueError("zero_init_residual needs the shortcuts: a plain network would output zeros")
        kind, blocks, widths, shortcut = RESNETS[depth]
        c = widths[0]
        big = _auto("stem", stem, image_size) == "imagenet"  # N x c x 56 x 56 at 224; 32 x 32 at 32
        self.conv1, self.bn1 = _conv_bn(in_channels, c, 7 if big else 3, 2 if big else 1)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if big else nn.Identity()
        for i, (n, width) in enumerate(zip(blocks, widths)):  # the first block of a stage downsamples
            stage = [Block(kind, c, width, 2 if i > 0 else 1, shortcut, plain)]
            c = width * (4 if kind == "bottleneck" else 1)
            stage += [Block(kind, c, width, 1, shortcut, plain) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        # 56 -> 56, 28, 14, 7 px at 224: N x 512 (bottleneck 2048) x 7 x 7; CIFAR 32 -> 32, 16, 8 px
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        _init_weights(self, linear_std=None)
        if zero_init_residual:  # each block starts as the identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, Block):  # the BatchNorm that closes the residual branch
                    nn.init.zeros_((m.bn3 if m.bottleneck else m.bn2).weight)

    def stages(self):  # layer1, layer2, ... in order
        return [m for n, m in self.named_children() if n.startswith("layer")]

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for layer in self.stages():
            x = layer(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# name -> builder(num_classes, in_channels=3, image_size=32, **options): a family class, or the
# class with its table row bound (partial), e.g. MODELS["resnet50"](1000, 3, 224).
MODELS = {
    "lenet5": LeNet5, "alexnet": AlexNet, "nin": NiN,
    **{f"vgg{d}{'_bn' * bn}": partial(VGG, d, bn) for bn in (False, True) for d in VGGS},
    "googlenet": GoogLeNet,
    **{f"resnet{d}": partial(ResNet, d) for d in RESNETS},
}


def _family(name):  # the class: partial(ResNet, 50).func is ResNet
    return getattr(MODELS[name], "func", MODELS[name])


def model_options(name):
    """The options build_model takes for this model, e.g. ('plain', 'stem', 'zero_init_residual')."""
    return _family(name).OPTIONS


def min_image_size(name, image_size=32, **options):
    """The smallest input side (px) that leaves every pool at least 1 x 1 px: the family's MIN_SIZE
    (per stem), 1 for VGG and the ResNets (they pad and pool adaptively)."""
    size = getattr(_family(name), "MIN_SIZE", 1)
    return size[_auto("stem", options.get("stem") or "auto", image_size)] if isinstance(size, dict) else size


def build_model(name, num_classes, in_channels=3, image_size=32, **options):
    """A freshly initialised model; image_size picks the 'auto' stem / head (adaptive pooling takes
    other sizes too); options valued None count as not given; bad arguments are a ValueError."""
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from: {', '.join(MODELS)}")
    sizes = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    for arg, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer (got {value!r})")
    options = {k: v for k, v in options.items() if v is not None}
    allowed = model_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = f"it takes: {', '.join(allowed)}" if allowed else "it takes no options"
        raise ValueError(f"{name} does not take option(s) {', '.join(unknown)}; {takes}")
    need = min_image_size(name, image_size, **options)
    if image_size < need:
        stem = f" with the {options['stem']} stem" if options.get("stem") not in (None, "auto") else ""
        raise ValueError(f"{name}{stem} needs images of at least {need}x{need} px (got {image_size}x"
                         f"{image_size}): its pooling would leave nothing to classify")
    return MODELS[name](num_classes, in_channels, image_size, **options)


def count_macs(model, input_shape):
    """Forward multiply-accumulates for one input of input_shape (N x C x H x W, or C x H x W for
    N=1), counted by torch.utils.flop_counter (convs and linears), in eval mode."""
    shape = (1, *input_shape) if len(input_shape) == 3 else tuple(input_shape)
    p = next(model.parameters(), torch.zeros(()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(shape, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def _model_name(name):
    if name not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {name!r}; choose from: {', '.join(MODELS)}")
    return name


def get_args_parser():
    from runtime import number  # the model code itself needs no runtime
    p = argparse.ArgumentParser(description="Parameters and forward MACs of every model.")
    p.add_argument("models", nargs="*", metavar="MODEL", type=_model_name,
                   help=f"default: all of {', '.join(MODELS)}")
    p.add_argument("--image-size", type=number(int, 1, 100_000), default=32)
    p.add_argument("--in-channels", type=number(int, 1, 1024), default=3)
    p.add_argument("--num-classes", type=number(int, 1, 1_000_000), default=10)
    return p


def main(args):
    """Parameters and MACs of each model, built on the meta device (shapes only: no memory, no
    compute). A model named on the command line that cannot take the size is build_model's error."""
    size, shape = args.image_size, (1, args.in_channels, args.image_size, args.image_size)
    small = {n: min_image_size(n, size) for n in args.models or MODELS if size < min_image_size(n, size)}
    if small and args.models:
        build_model(next(iter(small)), args.num_classes, args.in_channels, size)
    print(f"input {args.in_channels}x{size}x{size}, {args.num_classes} classes, default options\n\n"
          f"| {'model':<11} | {'params':>9} | {'MACs':>9} |\n|{'-' * 13}|{'-' * 11}|{'-' * 11}|")
    for name in [n for n in args.models or MODELS if n not in small]:
        with torch.device("meta"):
            model = build_model(name, args.num_classes, args.in_channels, size)
            params, macs = sum(p.numel() for p in model.parameters()), count_macs(model, shape)
        human = f"{macs / 1e9:.2f}G" if macs >= 1e9 else f"{macs / 1e6:.1f}M"
        print(f"| {name:<11} | {params / 1e6:8.2f}M | {human:>9} |")
    if small:
        print("note: left out, their pooling needs larger images: "
              + ", ".join(f"{n} (at least {m} px)" for n, m in small.items()), file=sys.stderr)


def cli(argv=None):
    from runtime import run_cli
    return run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
