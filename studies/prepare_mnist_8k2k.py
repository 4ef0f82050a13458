"""Split the official MNIST test set (10,000 images) into an 8,000 / 2,000 image folder.

    python studies/prepare_mnist_8k2k.py ../shared/data/mnist /tmp/mnist-8k2k
    python train.py --model resnet18 --dataset folder --data-dir /tmp/mnist-8k2k --channels 1

SRC holds t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (gzipped or not). OUT gets
train/<digit>/NNNNN.png and test/<digit>/NNNNN.png (grayscale PNGs; NNNNN is the image's index
in SRC; class folders "0".."9"), the layout of `--dataset folder`. The split is seeded and
stratified: every digit puts its share of its images (--test / N, rounded up or down)
into test/.
"""
import argparse
import gzip
import os
import struct
import sys

import numpy as np

IMAGES, LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned bytes, 3-D images / 1-D labels


def read_idx(src, name, ndim):
    """uint8 array from SRC/NAME.gz or SRC/NAME (IDX: big-endian magic and dims, then bytes)."""
    for path, opener in ((os.path.join(src, name + ".gz"), gzip.open), (os.path.join(src, name), open)):
        if os.path.isfile(path):
            break
    else:
        raise FileNotFoundError(f"missing {os.path.join(src, name)}(.gz)")
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    head = 4 + 4 * ndim
    if len(raw) < head or struct.unpack(">I", raw[:4])[0] != IDX_MAGIC[ndim]:
        raise ValueError(f"{path} is not an IDX file of {ndim}-D unsigned bytes "
                         f"(magic {IDX_MAGIC[ndim]:#010x})")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    if len(raw) - head != int(np.prod(dims)):
        raise ValueError(f"{path}: {len(raw) - head} data bytes for dims {dims}")
    return np.frombuffer(raw, np.uint8, offset=head).reshape(dims)


def stratified_split(labels, n_test, seed):
    """(train indices, test indices), both sorted: shuffle, sort by label (stable), then take
    n_test evenly spaced positions, so each class gives n_test/N of its images (rounded)."""
    n = len(labels)
    if not 0 < n_test < n:
        raise ValueError(f"--test must be between 1 and {n - 1} for {n} images, got {n_test}")
    perm = np.random.default_rng(seed).permutation(n)
    by_class = perm[np.argsort(labels[perm], kind="stable")]  # N, grouped by label, random within
    pick = (np.arange(n_test) * n) // n_test  # evenly spaced over the grouped order
    test = np.sort(by_class[pick])
    train = np.setdiff1d(np.arange(n), test)
    return train, test


def main(args):
    from PIL import Image
    images, labels = read_idx(args.src, IMAGES, 3), read_idx(args.src, LABELS, 1)  # N x H x W, N
    if len(images) != len(labels):
        raise ValueError(f"{args.src}: {len(images)} images but {len(labels)} labels")
    if labels.max() > 9:
        raise ValueError(f"{args.src}: labels must be digits 0-9, found {labels.max()}")
    for split in ("train", "test"):
        if os.path.exists(os.path.join(args.out, split)):
            raise ValueError(f"{os.path.join(args.out, split)} already exists; remove it or choose another OUT")
    train, test = stratified_split(labels, args.test, args.seed)
    for split, idx in (("train", train), ("test", test)):
        for i in idx:
            d = os.path.join(args.out, split, str(labels[i]))
            os.makedirs(d, exist_ok=True)
            Image.fromarray(images[i]).save(os.path.join(d, f"{i:05d}.png"))
    counts = np.bincount(labels[test], minlength=10)
    print(f"wrote {len(train)} train / {len(test)} test images to {args.out}/{{train,test}}/<digit>/ "
          f"(test per digit: {' '.join(map(str, counts))})")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", help=f"folder with {IMAGES}(.gz) and {LABELS}(.gz)")
    p.add_argument("out", help="output folder (gets train/ and test/)")
    p.add_argument("--test", type=int, default=2000, help="test images (default 2000; the rest train)")
    p.add_argument("--seed", type=int, default=0)
    return p


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
