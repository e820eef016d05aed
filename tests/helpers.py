"""Helpers of the tests, one copy of each (pytest finds this module through `pythonpath` in `pyproject.toml`):

* `official_sinkhorn`, `official_sinkhorn_in_dtype`, `official_swav_loss`: re-exported from the library's
  `self_supervised_swav.reference` (the official formulas of facebookresearch/swav, written plainly);
* `tiny_encoder` / `tiny_swav_model`: a 2-conv SwAV model that trains in milliseconds on CPU; `resnet_swav_model`: the
  same heads on a randomly initialised resnet10t (spatial feature maps, as the commands build);
* `tiny_pipelines`: multi-crop pipelines without colour or blur (gray digits), 2 large + 2 small crops;
* `digits_dls`, `digits_folder`: the scikit-learn digits as in-memory `DataLoaders` or as a folder of PNGs;
* `official_swav_state`: random weights in the layout of the official SwAV release (facebookresearch/swav), any ResNet;
* `Interrupt` / `KeepAt`: stop a fit at the start of an epoch / keep something of the learner when an epoch's training begins;
* `on_checkpoint`, `run_main`, `child_env`: act right after a run's checkpoint of an epoch is written (raise, or signal the
  process itself); call a command's `main(argv)` here (exit status, stderr); the environment of a child Python process.

The gloo launcher (`run_gloo`, `save_result`) is shared with the benchmarks: it lives in `bench/harness.py`, over the library's `distributed.run_on_cpus`.
"""
from __future__ import annotations
import os
import io
from contextlib import contextmanager, redirect_stderr, redirect_stdout
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException
from PIL import Image
from torch import nn

from self_supervised_swav.layers import create_encoder
from self_supervised_swav.reference import official_sinkhorn, official_sinkhorn_in_dtype, official_swav_loss  # noqa: F401 (re-exported)
from self_supervised_swav.resume import ResumeRandomState
from self_supervised_swav.swav import create_swav_model, get_swav_aug_pipelines

TESTS = Path(__file__).resolve().parent


def tiny_encoder(n_in: int = 1, bn: bool = False) -> nn.Module:
    "Two strided convolutions and average pooling: 16 features"
    norm = [nn.BatchNorm2d(8)] if bn else []
    return nn.Sequential(nn.Conv2d(n_in, 8, 3, stride=2, padding=1), *norm, nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def tiny_swav_model(n_protos: int = 10, projection_size: int = 16, bn: bool = False, n_in: int = 1) -> nn.Module:
    "A SwAVModel around `tiny_encoder`; `bn` puts BatchNorm in encoder and projector (without, samples are independent of the batch)"
    return create_swav_model(tiny_encoder(n_in, bn), hidden_size=32, projection_size=projection_size, n_protos=n_protos, bn=bn)


class HandMadeSwAV(nn.Module):
    "A SwAV model written by hand, not a `SwAVModel`: encoder, projector and a `prototypes` nn.Linear, returning (embedding, scores)"
    def __init__(self, n_protos: int = 10, projection_size: int = 16, bn: bool = False, n_in: int = 1):
        super().__init__()
        self.encoder = tiny_encoder(n_in, bn)
        self.projector = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, projection_size))
        self.prototypes = nn.Linear(projection_size, n_protos, bias=False)
    def forward(self, crops):
        z = nn.functional.normalize(self.projector(torch.cat([self.encoder(c) for c in crops])), dim=1)
        return z, self.prototypes(z)


def resnet_swav_model(n_in: int = 1, n_protos: int = 6) -> nn.Module:
    "A SwAVModel around a randomly initialised resnet10t (seeded: the same weights at each call), in eval mode"
    torch.manual_seed(0)
    return create_swav_model(create_encoder("resnet10t", pretrained=False, n_in=n_in), hidden_size=32, projection_size=16,
                             n_protos=n_protos).eval()


def tiny_pipelines(sizes: tuple[int, int] = (16, 8), num_crops: tuple[int, int] = (2, 2), **kwargs):
    "Multi-crop pipelines for gray digits: no colour, no blur, no normalisation"
    kw = dict(rotate=False, jitter=False, bw=False, blur=False, stats=None) | kwargs
    return get_swav_aug_pipelines(num_crops=list(num_crops), crop_sizes=list(sizes), min_scales=[0.25, 0.05],
                                  max_scales=[1., 0.3], **kw)


# ---- data
def digits_dls(digits: tuple, n: int, bs: int):
    "DataLoaders of the first `n` of `digits` (images, labels), 80 % train / 20 % valid, on the CPU"
    from self_supervised_swav.data import image_tensor_dls
    x, y = digits
    return image_tensor_dls(x[:n], y[:n], valid_pct=0.2, bs=bs, device="cpu")


def digits_folder(root: Path, digits: tuple, n: int = 20, rgb: bool = False, classes: tuple = (0, 1)) -> Path:
    "`n` of `digits` (images, labels) of `classes` as PNGs in one sub-folder per class (`class_0`, ...); `rgb`: RGB files, halved"
    x, y = digits
    per = -(-n // len(classes))
    keep = torch.cat([(y == c).nonzero()[:per] for c in classes]).flatten()[:n]
    for i in keep.tolist():
        d = root / f"class_{y[i].item()}"; d.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8))
        (im.convert("RGB").point(lambda v: v // 2) if rgb else im).save(d / f"{i}.png")
    return root


# ---- stopping a fit, and looking at it
class Interrupt(Callback):
    "Stop the fit at the start of epoch `epoch`, as a crash between epochs would; `kept` holds `keep(learn)` of that moment"
    order = -20
    def __init__(self, epoch: int, keep: Callable[[Any], Any] | None = None): self.stop_epoch, self.keep, self.kept = epoch, keep, None
    def before_epoch(self):
        if self.epoch != self.stop_epoch: return
        if self.keep is not None: self.kept = self.keep(self.learn)
        raise CancelFitException()


class KeepAt(Callback):
    "`kept`: `keep(learn)` when the training of epoch `epoch` begins, after `ResumeRandomState` has restored the random states"
    order = ResumeRandomState.order + 1
    def __init__(self, epoch: int, keep: Callable[[Any], Any]): self.at, self.keep, self.kept = epoch, keep, None
    def before_train(self):
        if self.epoch == self.at: self.kept = self.keep(self.learn)


@contextmanager
def on_checkpoint(epoch: int, action: Callable[[], None] | BaseException):
    "Inside: right after the run's checkpoint of epoch `epoch` is written (`checkpoint.save_checkpoint`), `action()` runs (or is raised)"
    import self_supervised_swav.checkpoint as ck
    orig = ck.save_checkpoint
    def save(learn, path, epoch_, *args, **kwargs):
        res = orig(learn, path, epoch_, *args, **kwargs)
        if epoch_ != epoch: return res
        if isinstance(action, BaseException): raise action
        action()
        return res
    ck.save_checkpoint = save
    try: yield
    finally: ck.save_checkpoint = orig


def run_main(main: Callable, *argv) -> tuple[int, str]:
    "Call a command's `main(argv)` in this process: (its exit status, what it wrote on stderr); its stdout is dropped"
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        try: main([str(a) for a in argv]); code = 0
        except SystemExit as e: code = e.code if isinstance(e.code, int) else 1
    return code, err.getvalue()


def child_env(**env: str) -> dict:
    "The environment of a child Python process: as many torch threads as here (the same float rounding), `tests/` importable"
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return os.environ | dict(OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=path) | env


def official_swav_state(arch: str = "resnet18", hidden: int = 64, proj: int = 16, n_protos: int = 30) -> dict:
    "Random weights laid out as the official SwAV checkpoints: torchvision ResNet keys and `projection_head.{0,1,3}`, `prototypes`, all prefixed `module.`"
    import torchvision
    tv = getattr(torchvision.models, arch)()
    head = nn.Sequential(nn.Linear(tv.fc.in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, proj))
    sd = {f"module.{k}": v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    sd.update({f"module.projection_head.{k}": v for k, v in head.state_dict().items()})
    return {**sd, "module.prototypes.weight": torch.randn(n_protos, proj)}


# ---- what a run computed, apart from what it measured
TIMING = ("time", "data_wait", "images_s")   # epoch columns measured on the clock: they differ from run to run


def computed(epochs: list[dict]) -> list[dict]:
    "The rows of an epoch table without the columns measured on the clock (`TIMING`)"
    return [{k: v for k, v in e.items() if k not in TIMING} for e in epochs]


def run_epochs(out: Path) -> list[dict]:
    "The epoch table of a run, from its swav_pretrain.json"
    return json.loads((out / "swav_pretrain.json").read_text())["epochs"]


def run_weights(out: Path) -> dict:
    "The whole model's weights that a run saved"
    return torch.load(out / "swav_model.pth", weights_only=True)["model"]


def assert_same_run(out: Path, full: Path):
    "The run in `out` ended with the weights and the last epoch's figures of the run in `full`, to the bit"
    a, b = run_weights(full), run_weights(out)
    for k in a: torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=k)
    for key in ("valid_loss", "knn_top1", "protos_used"): assert run_epochs(out)[-1][key] == run_epochs(full)[-1][key], key
