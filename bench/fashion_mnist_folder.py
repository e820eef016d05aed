"""Fashion-MNIST as a folder of gray 28 px PNGs with one sub-folder per class, for zero-flag `swav_pretrain` runs, and the
kNN top-1 of the encoder such a run wrote.

    .venv/bin/python bench/fashion_mnist_folder.py write tmp/fm              # tmp/fm/train (60k), tmp/fm/test (10k)
    .venv/bin/python bench/fashion_mnist_folder.py write tmp/fmv --val       # tmp/fmv/train: the first 50k training images only
    swav_pretrain --path tmp/fm/train --budget 20m --output runs/fm
    .venv/bin/python bench/fashion_mnist_folder.py knn runs/fm/encoder.pth   # bank: 60k training images, queries: 10k test images
    .venv/bin/python bench/fashion_mnist_folder.py knn runs/fmv/encoder.pth --val   # bank: the first 50k, queries: the last 10k

kNN as `fashion_mnist.py` measures it (k=20, temperature 0.07, cosine), on the images at the encoder's image size,
normalised with the statistics its file records.
"""
from __future__ import annotations
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from fashion_mnist import encoder_features, load_fashion_mnist
from self_supervised_swav.evaluation import features_knn_accuracy
from self_supervised_swav.modelfile import load_pretrained_encoder
from self_supervised_swav.normalization import InputNormalization

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def write_folder(out: Path, x: torch.Tensor, y: torch.Tensor):
    "Each image as out/CLASS/i.png (gray, 28 px)"
    for c in CLASSES: (out / c).mkdir(parents=True, exist_ok=True)
    arr = (x[:, 0] * 255).round().to(torch.uint8).numpy()
    for i, (a, label) in enumerate(zip(arr, y.tolist())): Image.fromarray(a, mode="L").save(out / CLASSES[label] / f"{i:05d}.png")


def splits(val: bool):
    "(bank images, bank labels, query images, query labels): the training and test sets, or the validation split of the training set"
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    return (x_train[:50_000], y_train[:50_000], x_train[50_000:], y_train[50_000:]) if val else (x_train, y_train, x_test, y_test)


def knn(encoder_path: str, val: bool) -> float:
    "kNN top-1 of a saved encoder: bank and queries as `splits` says"
    encoder, meta = load_pretrained_encoder(encoder_path)
    xb, yb, xq, yq = splits(val)
    size = meta["image_size"]
    resize = (lambda x: x) if size == 28 else (lambda x: F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False))
    tfm = InputNormalization(*meta["stats"]) if meta.get("stats") else None
    def feats(x, y):
        x = resize(x).expand(-1, meta["n_in"], -1, -1)
        return F.normalize(encoder_features(encoder.eval(), x, y, tfm), dim=1)
    return features_knn_accuracy(feats(xb, yb), yb, feats(xq, yq), yq, k=20, temp=0.07)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["write", "knn"])
    p.add_argument("path", help="write: the folder to create; knn: an encoder.pth")
    p.add_argument("--val", action="store_true", help="the validation split: first 50k training images / last 10k")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.what == "write":
        xb, yb, xq, yq = splits(args.val)
        write_folder(Path(args.path) / "train", xb, yb)
        if not args.val: write_folder(Path(args.path) / "test", xq, yq)
        print(f"wrote {len(xb)} training images to {args.path}/train" + ("" if args.val else f" and {len(xq)} test images to {args.path}/test"))
    else:
        print(f"kNN top-1 (k=20) on the {'validation' if args.val else 'test'} images: {knn(args.path, args.val):.4f}")


if __name__ == "__main__": main()
