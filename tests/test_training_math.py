"""The training loop's arithmetic against independent references: the EMA against
torch.optim.swa_utils' EMA averaging, mixup/cutmix label mixing against the pixels actually
mixed, and the tensor path's batched augmentation against torchvision.transforms.v2 on the
same images (statistics over many draws)."""
import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as v2

import data
import models
import train


def test_ema_equals_swa_utils_reference():
    torch.manual_seed(0)
    model = models.build_model("resnet20", 10, 3, 16)
    decay = 0.9
    ours = train.EMA(model, decay)
    ref = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=False)
    ref.update_parameters(model)  # its first call copies the weights, as our EMA's construction does
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(5):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ours.update(model)
        ref.update_parameters(model)
    for a, b in zip(ours.module.parameters(), ref.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(ours.module.buffers(), model.buffers()):  # BatchNorm statistics: copied
        assert torch.equal(a, b)
    assert not torch.equal(next(ours.module.parameters()), next(model.parameters()))


def constant_images(n, size=16):
    """Image i is filled with the value i: which source a pixel came from can be read back."""
    return torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, size, size).clone()


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_lambda_is_the_pasted_area(seed):
    n, size = 16, 16
    x, y = constant_images(n, size), torch.arange(n) % 10
    rng = np.random.default_rng(seed)
    xm, y1, y2, lam = train.mix_batch(x, y, 0.0, 1.0, rng)
    # the partner of image i: the value of its pasted pixels (the same permutation for all)
    pasted = (xm != x).all(1)  # N x H x W: pixels taken from another image
    partner = torch.tensor([int(xm[i][:, pasted[i]].flatten()[0]) if pasted[i].any() else i for i in range(n)])
    area = pasted.float().mean((1, 2))  # per image, the same box for all
    moved = partner != torch.arange(n)
    assert torch.allclose(area[moved], torch.full_like(area[moved], 1 - lam))
    assert torch.equal(y1, y) and torch.equal(y2[moved], y[partner[moved]])
    # mixed targets lam * onehot(y1) + (1 - lam) * onehot(y2) sum to 1
    t = lam * torch.nn.functional.one_hot(y1, 10) + (1 - lam) * torch.nn.functional.one_hot(y2, 10)
    assert torch.allclose(t.sum(1), torch.ones(n, dtype=t.dtype))


@pytest.mark.parametrize("seed", range(4))
def test_mixup_lambda_is_the_pixel_weight(seed):
    n = 16
    x, y = constant_images(n), torch.arange(n) % 10
    xm, y1, y2, lam = train.mix_batch(x, y, 0.4, 0.0, np.random.default_rng(seed))
    # value = lam * i + (1 - lam) * j, j the partner: recover j and check the labels follow it
    j = ((xm[:, 0, 0, 0] - lam * torch.arange(n)) / (1 - lam)).round().long()
    assert torch.allclose(xm[:, 0, 0, 0], lam * torch.arange(n) + (1 - lam) * j.float(), atol=1e-4)
    assert torch.equal(y2, y[j]) and 0 < lam < 1


def test_no_mixing_when_off():
    x, y = constant_images(4), torch.arange(4)
    xm, y1, y2, lam = train.mix_batch(x, y, 0.0, 0.0, np.random.default_rng(0))
    assert xm is x and lam == 1.0 and torch.equal(y2, y)


def test_tensor_path_crop_flip_matches_v2_statistics():
    """Per-pixel mean and the flip rate of the standard preset over many draws: tensor path vs
    torchvision.transforms.v2's RandomCrop(padding) + RandomHorizontalFlip on the same images."""
    g = torch.Generator().manual_seed(0)
    n, size = 256, 16
    # left half dark, right half bright: a flip shows up in the mean of the left columns
    img = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    img[..., size // 2:] = 200
    img += torch.randint(0, 20, img.shape, generator=g, dtype=torch.uint8)
    split = data.Split(img, torch.zeros(n, dtype=torch.int64))
    loader = data.make_loader(split, mean=(0, 0, 0), std=(1, 1, 1), batch_size=n, train=True,
                              augment="standard", seed=0)
    ours = torch.cat([next(iter(loader))[0] for _ in range(8)]) * 255  # 2048 draws, 0..255 scale
    torch.manual_seed(0)
    t = v2.Compose([v2.RandomCrop(size, padding=data.crop_padding(size)), v2.RandomHorizontalFlip()])
    ref = torch.stack([t(img[i % n]).float() for i in range(len(ours))])
    # column profile (mean over images, channels and rows): same shape within sampling noise
    ours_cols, ref_cols = ours.mean((0, 1, 2)), ref.mean((0, 1, 2))
    assert (ours_cols - ref_cols).abs().max() < 6.0, (ours_cols, ref_cols)
    # zero padding seen: fraction of exact-zero pixels agrees
    ours_zero, ref_zero = (ours == 0).float().mean(), (ref == 0).float().mean()
    assert abs(ours_zero - ref_zero) < 0.01 and ref_zero > 0.01
    # flip rate: images whose left quarter is brighter than their right quarter
    def flipped(b):
        return (b[..., : size // 4].mean((1, 2, 3)) > b[..., -size // 4:].mean((1, 2, 3))).float().mean()
    assert abs(flipped(ours) - flipped(ref)) < 0.05 and 0.4 < flipped(ref) < 0.6
