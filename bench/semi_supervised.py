"""The semi-supervised measure of the SwAV paper (its Table 2) on Fashion-MNIST: fine-tune on 1 % and 10 % of the
training labels (600 and 6,000 images, class-balanced, fixed seed) and report top-1 on the 10k test images of

* the SwAV-pretrained encoder, fine-tuned end to end with a linear head (`finetune_learner(..., freeze=False)`),
* the same encoder from random initialisation, trained the same way on the same labels with the same budget,
* raw pixels with the same labels: weighted kNN (k=20, cosine, T=0.07) and logistic regression (scikit-learn).

    .venv/bin/python bench/fashion_mnist.py --threads 2 --save_encoder tmp/fm_encoder.pth ...   # pretrain, keep the weights
    .venv/bin/python bench/semi_supervised.py --encoder tmp/fm_encoder.pth [the same --arch/--channels/--no_stem_pool]

Both networks see the same batches in the same order (same seed), the same augmentation (random resized crop of
area 0.5-1 and a horizontal flip, per image, on the batch) and the same one-cycle Adam schedule; the number of
epochs per label budget is fixed in advance (`--epochs`), not chosen on the test images.
"""
from __future__ import annotations
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fashion_mnist as fm   # the quality benchmark's data, encoder and results file


def balanced_subset(y: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    "Indices of `n` images of `y`, the same number of each class, drawn with `seed`"
    classes = y.unique()
    if n % len(classes): raise SystemExit(f"--labels: {n} is not a multiple of the {len(classes)} classes")
    g = torch.Generator().manual_seed(seed)
    per = n // len(classes)
    return torch.cat([(y == c).nonzero().flatten()[torch.randperm(int((y == c).sum()), generator=g)[:per]] for c in classes])


def train_augs():
    "Random resized crop (area 0.5-1) and flip per image, on a whole batch of 28 px images"
    from self_supervised_swav.augmentations import get_batch_augs
    return get_batch_augs(28, rotate=False, jitter=False, bw=False, blur=False, stats=None, resize_scale=(0.5, 1.0))


def finetune(encoder: nn.Module, x, y, x_test, y_test, epochs: int, args, seed: int) -> float:
    "Test top-1 after fine-tuning `encoder` (inputs normalised in the model) with a linear head on (x, y) for `epochs`"
    from fastai.callback.core import Callback, CancelValidException
    from fastai.data.core import DataLoaders
    from fastai.torch_core import set_seed
    import fastai.callback.schedule  # noqa: F401  (fit_one_cycle)
    from self_supervised_swav.data import ImageTensorDataset
    from self_supervised_swav.finetune import finetune_learner
    from self_supervised_swav.normalization import InputNormalization

    augs = train_augs()
    class TrainAugs(Callback):
        "The augmentation on training batches only; no validation during training (the test images are scored once, at the end)"
        def before_batch(self):
            if self.training: self.learn.xb = (augs(self.x),)
        def before_validate(self): raise CancelValidException()

    set_seed(seed)
    dls = DataLoaders.from_dsets(ImageTensorDataset(x, y), ImageTensorDataset(x_test, y_test), bs=args.bs, num_workers=0,
                                 device=torch.device("cpu"))
    model = nn.Sequential(InputNormalization(*fm.STATS), encoder)
    learn = finetune_learner(dls, model, n_out=10, freeze=False, train_bn=True, cbs=[TrainAugs()], wd=args.wd)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, args.lr)
        learn.remove_cb(TrainAugs)
        preds, targs = learn.get_preds(dl=dls.valid)
    return round(float((preds.argmax(1) == targs).float().mean()), 4)


def raw_pixels(x, y, x_test, y_test, seed: int) -> dict:
    "kNN and logistic regression on the raw pixels of the labelled images"
    from sklearn.linear_model import LogisticRegression
    from self_supervised_swav.evaluation import features_knn_accuracy
    knn = features_knn_accuracy(F.normalize(x.flatten(1), dim=1), y, F.normalize(x_test.flatten(1), dim=1), y_test, k=20, temp=0.07)
    logreg = LogisticRegression(max_iter=1000, C=1.0, random_state=seed).fit(x.flatten(1).numpy(), y.numpy())
    return dict(raw_pixels_knn=round(knn, 4), raw_pixels_logreg=round(float(logreg.score(x_test.flatten(1).numpy(), y_test.numpy())), 4))


def main(args):
    from self_supervised_swav.modelfile import load_encoder
    torch.set_num_threads(args.threads)
    x_train, y_train, x_test, y_test = fm.load_fashion_mnist()
    results = dict(command="python bench/semi_supervised.py " + " ".join(args.argv), settings={k: v for k, v in vars(args).items() if k != "argv"},
                   machine=dict(cpu_threads=torch.get_num_threads(), torch=torch.__version__), rows=[])
    for n, epochs in zip(args.labels, args.epochs):
        idx = balanced_subset(y_train, n, args.seed)
        x, y = x_train[idx], y_train[idx]
        t = time.time()
        row = dict(labels=n, pct=round(100 * n / len(x_train), 1), epochs=epochs)
        row["pretrained"] = finetune(load_encoder(fm.build_encoder(args), args.encoder), x, y, x_test, y_test, epochs, args, args.seed)
        torch.manual_seed(args.seed)
        row["scratch"] = finetune(fm.build_encoder(args), x, y, x_test, y_test, epochs, args, args.seed)
        row.update(raw_pixels(x, y, x_test, y_test, args.seed), seconds=round(time.time() - t))
        print(json.dumps(row), flush=True)
        results["rows"].append(row)
    print("| labels | epochs | SwAV-pretrained, fine-tuned | same encoder from scratch | raw pixels kNN | raw pixels logistic regression |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results["rows"]:
        print(f"| {r['labels']} ({r['pct']} %) | {r['epochs']} | **{r['pretrained']:.4f}** | {r['scratch']:.4f} | "
              f"{r['raw_pixels_knn']:.4f} | {r['raw_pixels_logreg']:.4f} |")
    fm.write_results(results, args.out)
    return results


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", required=True, help="the pretrained encoder's weights (fashion_mnist.py --save_encoder)")
    fm.add_encoder_args(p)
    p.add_argument("--labels", type=int, nargs="+", default=[600, 6000], help="labelled training images per run (1 %% and 10 %%)")
    p.add_argument("--epochs", type=int, nargs="+", default=[60, 15], help="epochs for each --labels (the same for both networks)")
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--wd", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/semi_supervised.json")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if len(args.epochs) != len(args.labels): raise SystemExit("--epochs: give one number of epochs per --labels value")
    if not Path(args.encoder).is_file(): raise SystemExit(f"--encoder: no file at {args.encoder} (write one with fashion_mnist.py --save_encoder)")
    args.argv = argv
    return args


if __name__ == "__main__":
    main(parse())
