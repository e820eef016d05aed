"""The contenders of the SwAV step benchmarks (`bench_step.py`, `bench_scaling.py`) and what they share: settings,
images, the encoder, the crops' pipelines.

* `Project`: `Learner(dls, create_swav_model(...), cbs=SWAV(get_swav_aug_pipelines(...), ...))`, `learn.fit`: uint8
  images, `IntToFloatTensor`, kornia batch augmentation in the callback, as a user runs it.
* `Original`: the original fastai library `self_supervised` 1.0.4 (`create_timm_encoder`, its `create_swav_model` and
  `SWAV` callback, its pipelines set to the official recipe), in the same `Learner` wiring. Skipped when not installed.
* `Lightly`: lightly's `SwaVProjectionHead`, `SwaVPrototypes`, `SwaVLoss`, `MemoryBankModule` queues and its per-image
  `SwaVTransform` in `DataLoader` workers, wired as in lightly's `examples/pytorch/swav_queue.py` (one encoder call per
  crop). Skipped with a message when lightly is not installed.
* `Floor`: the project's model forward (encoder, projector, prototypes) and backward on crops made beforehand, with a
  cross-entropy to fixed random labels, and the optimiser step: what any SwAV implementation pays at least.

Each has a `name` and `run(n)`: the seconds of `n` steps, each from the end of the previous one (so waiting for the
next batch is included), as `harness.run_interleaved` wants.
"""
from __future__ import annotations
import argparse
import importlib.util
import os
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness import Laps, set_threads

CONFIGS = {   # crop sizes/counts, batch, source image side, queue length per assignment crop when the queue is on
    "cpu": dict(bs=32, crop_sizes=(64, 32), num_crops=(2, 6), img_size=96, queue=480, workers=2),
    "gpu": dict(bs=256, crop_sizes=(224, 96), num_crops=(2, 6), img_size=256, queue=3840, workers=8),
}
TINY = dict(bs=4, crop_sizes=(16, 8), img_size=20, queue=8, workers=0)
MIN_SCALES, MAX_SCALES = (0.14, 0.05), (1.0, 0.14)   # official SwAV multi-crop scales, for every contender
CROP_IDS = [0, 1]
LIGHTLY_MISSING = "lightly is not installed: lightly rows skipped (pip install lightly, see bench/README.md)"


# ---- settings
def add_common_args(p: argparse.ArgumentParser):
    "Arguments shared by `bench_step.py` and `bench_scaling.py`"
    p.add_argument("--config", default="cpu", choices=list(CONFIGS), help="Crop sizes, batch, image side, queue: see CONFIGS")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--arch", default="resnet18", help="timm or fastai encoder name (no pretrained weights)")
    p.add_argument("--bs", type=int, help="Batch size (images per step); default from --config")
    p.add_argument("--n-protos", type=int, default=3000, help="Number of prototypes")
    p.add_argument("--hidden", type=int, default=512, help="Hidden width of the projection MLP")
    p.add_argument("--queue", type=int, help="Queue length per assignment crop when the queue is on; default from --config")
    p.add_argument("--small-crops", type=int, help="Number of small crops; default from --config (6)")
    p.add_argument("--steps", type=int, default=2, help="Timed steps per round and contender")
    p.add_argument("--warmup", type=int, default=1, help="Untimed steps at the start of each round")
    p.add_argument("--rounds", type=int, default=6, help="Interleaved rounds (the order of the contenders rotates)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0: torch's default (all cores). "
                   "1 by default: on a loaded machine 2 OpenMP threads wait on each other and times triple")
    p.add_argument("--channels-last", action="store_true", help="Model and crops in channels_last memory format")
    p.add_argument("--precisions", default="fp32", help="Comma-separated: fp32 and/or bf16 (autocast, `learn.to_bf16()`); "
                   "each contender runs in each, the bf16 ones named `NAME bf16`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="Also write the results to this JSON file")
    p.add_argument("--tiny", action="store_true", help="A seconds-long configuration, to check the script runs")


def finish_args(a: argparse.Namespace) -> argparse.Namespace:
    "A copy of the parsed arguments `a` with the defaults that depend on --config and --tiny filled in; sets torch's threads"
    a, cfg = argparse.Namespace(**vars(a)), dict(CONFIGS[a.config])
    if a.tiny:
        cfg.update(TINY)
        a.steps, a.warmup, a.rounds, a.n_protos, a.hidden = 2, 1, 1, 20, 32
    if a.small_crops is not None: cfg["num_crops"] = (cfg["num_crops"][0], a.small_crops)
    for k, v in cfg.items():
        if getattr(a, k, None) is None: setattr(a, k, v)
    set_threads(a.threads)
    a.device = torch.device(a.device)
    return a


def describe(a: argparse.Namespace) -> str:
    "The settings of a run, in words"
    crops = " + ".join(f"{n}x{s}" for n, s in zip(a.num_crops, a.crop_sizes))
    return (f"{a.arch}, crops {crops} px from {a.img_size} px images, batch {a.bs}, n_protos {a.n_protos}, "
            f"device {a.device}, {torch.get_num_threads()} torch threads on {os.cpu_count()} cores, "
            f"lightly workers {a.workers}{', channels_last' if a.channels_last else ''}; "
            f"median of {a.steps} steps x {a.rounds} interleaved rounds after {a.warmup} warm-up step(s) each")


BF16 = " bf16"   # the suffix of a contender's name in bfloat16


def in_precision(cls, a: argparse.Namespace, images: Tensor, queue: int, name: str, precision: str):
    "Contender `cls` built with `a.bf16` set for `precision` (fp32 or bf16), named `name` plus ` bf16` for bf16"
    if precision not in ("fp32", "bf16"): raise ValueError(f"--precisions: fp32 or bf16, got {precision!r}")
    c = cls(argparse.Namespace(**vars(a), bf16=precision == "bf16"), images, queue)
    c.name = name + (BF16 if precision == "bf16" else "")
    return c


def autocast(a: argparse.Namespace):
    "bfloat16 autocast on the run's device when `a.bf16`, else nothing"
    return torch.autocast(a.device.type, dtype=torch.bfloat16, enabled=getattr(a, "bf16", False))


def lightly_available() -> bool: return importlib.util.find_spec("lightly") is not None


def available(names: list[str]) -> list[str]:
    "`names` without lightly when it is not installed (said in the report)"
    if "lightly" in names and not lightly_available():
        print(LIGHTLY_MISSING); names = [n for n in names if n != "lightly"]
    if "original" in names and not original_available():
        print(ORIGINAL_MISSING); names = [n for n in names if n != "original"]
    return names


# ---- data and models shared by the contenders
def make_images(n: int, size: int, seed: int = 0) -> Tensor:
    "`n` smooth random uint8 RGB images `[n, 3, size, size]` (upsampled noise: blur and jitter see real structure)"
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, max(2, size // 8), max(2, size // 8), generator=g)
    return (F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def n_images(a: argparse.Namespace, queue: int = 0) -> int:
    "Enough images for a round without repeats, and at least the queue length (`SWAV` checks K <= dataset size)"
    return max(a.bs * (a.warmup + a.steps), a.queue, queue, 2 * a.bs)


def make_encoder(a: argparse.Namespace) -> nn.Module:
    from self_supervised_swav.layers import PoolingType, create_encoder
    return create_encoder(a.arch, pretrained=False, pool_type=PoolingType.Avg)


def make_swav_model(a: argparse.Namespace) -> nn.Module:
    "The project's model: encoder, MLP projector (BatchNorm), unit-norm prototypes"
    from self_supervised_swav.swav import create_swav_model
    torch.manual_seed(a.seed)
    model = create_swav_model(make_encoder(a), hidden_size=a.hidden, projection_size=128, n_protos=a.n_protos)
    return to_format(model.to(a.device), a)


def to_format(t, a: argparse.Namespace):
    "`t` (a model or a 4-d batch) in channels_last when --channels-last"
    if not a.channels_last or (isinstance(t, Tensor) and t.ndim != 4): return t
    return t.to(memory_format=torch.channels_last)


def swav_augs(a: argparse.Namespace):
    "The project's `MultiCrop` of the run's crops (official scales and recipe)"
    from self_supervised_swav.swav import get_swav_aug_pipelines
    return get_swav_aug_pipelines(num_crops=list(a.num_crops), crop_sizes=list(a.crop_sizes),
                                  min_scales=list(MIN_SCALES), max_scales=list(MAX_SCALES))


def before_augs(a: argparse.Namespace):
    "`swav_augs(a)` as the library made them before issue 14: kornia's crop called once per crop, kornia's ColorJitter"
    import kornia.augmentation as K
    from fastai.data.core import Pipeline, Transform
    from self_supervised_swav.augmentations import FastColorJitter, KorniaTfm, MultiCrop

    class KorniaCrop(Transform):   # not a KorniaTfm, so MultiCrop runs it once per crop, as it did
        def __init__(self, aug): super().__init__(); self.aug = aug
        def encodes(self, x: Tensor): return self.aug(x)

    def before(t):
        if isinstance(t, KorniaTfm) and isinstance(t.aug, K.RandomResizedCrop): return KorniaCrop(t.aug)
        if isinstance(t, KorniaTfm) and isinstance(t.aug, FastColorJitter):
            j = t.aug
            return KorniaTfm(K.ColorJitter(j.brightness, j.contrast, j.saturation, j.hue, p=j.p, same_on_batch=j.same_on_batch), rgb_only=t.rgb_only)
        return t
    multi_crop = swav_augs(a)
    return MultiCrop([Pipeline([before(t) for t in p.fs], split_idx=0) for p in multi_crop], groups=multi_crop.groups)


def sgd(params, lr: float = 0.05): return torch.optim.SGD(params, lr=lr, momentum=0.9)


def fill_queue(model: nn.Module, queue: int, n_queues: int):
    "A full queue of random unit embeddings, so that it enters Sinkhorn from the first step (lightly's queues start so)"
    g = torch.Generator().manual_seed(1)
    dim = model.prototypes.in_features
    model.queue.configure(n_queues, queue, dim)
    model.queue.push(F.normalize(torch.randn(n_queues, queue, dim, generator=g), dim=-1))


# ---- contender: the project, through fastai
class _ImageDataset(torch.utils.data.Dataset):
    "uint8 images as fastai `TensorImage`s (so `IntToFloatTensor` applies), with a dummy label (fastai needs a target)"
    def __init__(self, images: Tensor): self.images = images
    def __len__(self): return len(self.images)
    def __getitem__(self, i):
        from fastai.torch_core import TensorImage
        return TensorImage(self.images[i]), 0


def _step_timer_cb(device: torch.device):
    "A callback timing each training batch (end to end) and stopping the epoch after `n` batches, with no validation"
    from fastai.callback.core import Callback, CancelEpochException, CancelValidException

    class StepTimer(Callback):
        order = 100   # after every other callback's after_batch
        def __init__(self): self.n, self.laps = 0, Laps(device)
        def before_train(self): self.laps.start()
        def after_batch(self):
            self.laps.lap()
            if len(self.laps.times) >= self.n: raise CancelEpochException()
        def before_validate(self): raise CancelValidException()
    return StepTimer()


def _channels_last_cb():
    "A callback putting the crops in channels_last (the model is converted beforehand)"
    from fastai.callback.core import Callback
    class ChannelsLastCrops(Callback):
        order = 11   # after SWAV (9) made the crops
        def before_batch(self): self.learn.xb = ([c.contiguous(memory_format=torch.channels_last) for c in self.xb[0]],)
    return ChannelsLastCrops()


def _set_by_swav(*_):
    "Placeholder loss: `SWAV` sets `learn.loss_func` for the fit and restores this one after"
    raise RuntimeError("SWAV should have replaced the loss function")


def fastai_learner(a: argparse.Namespace, images: Tensor, model: nn.Module, swav_cb) -> tuple:
    "(learner, step timer): `model` trained by the callback `swav_cb` on `images` (uint8, `IntToFloatTensor`), SGD"
    from fastai.callback.progress import ProgressCallback  # noqa: F401  (adds Learner.no_bar)
    from fastai.data.core import DataLoaders, TfmdDL
    from fastai.data.transforms import IntToFloatTensor
    from fastai.learner import Learner
    from fastai.optimizer import OptimWrapper
    dl = partial(TfmdDL, _ImageDataset(images), bs=a.bs, shuffle=True, drop_last=True, after_batch=[IntToFloatTensor()],
                 device=a.device, num_workers=0)   # batches are slices of a uint8 tensor: workers would only add start-up time per fit
    timer = _step_timer_cb(a.device)
    cbs = [swav_cb, timer] + ([_channels_last_cb()] if a.channels_last else [])
    learn = Learner(DataLoaders(dl(), dl(), device=a.device), model, loss_func=_set_by_swav, cbs=cbs,
                    opt_func=partial(OptimWrapper, opt=torch.optim.SGD, momentum=0.9), lr=0.05)
    learn.create_opt()   # now, not in the first fit (whose phases may be timed)
    if getattr(a, "bf16", False):
        import self_supervised_swav.precision  # noqa: F401  (Learner.to_bf16 on the learner's device: CPU autocast too)
        learn.to_bf16()
    return learn, timer


class Project:
    "The project as a user runs it: `Learner` + `SWAV`, `learn.fit(1)` for each round"
    def __init__(self, a: argparse.Namespace, images: Tensor, queue: int, name: str = "project"):
        from self_supervised_swav.swav import SWAV
        self.name, self.a = name, a
        self.model = make_swav_model(a)
        if queue: fill_queue(self.model, queue, len(CROP_IDS))
        swav = SWAV((before_augs if name == "project-before" else swav_augs)(a), CROP_IDS, K=queue or None, queue_start_pct=0., freeze_protos_iters=0)
        self.learn, self.timer = fastai_learner(a, images, self.model, swav)

    def run(self, n: int) -> list[float]:
        self.timer.n = n
        with self.learn.no_bar(), self.learn.no_logging(): self.learn.fit(1)
        return self.timer.laps.times

    @staticmethod
    def phases() -> list[tuple[object, str, str]]:
        "The public methods of a step's phases, `(owner, attr, label)` for `harness.wrapped`, in the order they run"
        from self_supervised_swav import swav as S
        from self_supervised_swav.augmentations import MultiCrop
        return [(MultiCrop, "__call__", "augmentation (MultiCrop.__call__)"),
                (S.SwAVModel, "forward", "model forward (SwAVModel.forward)"),
                (S.SwAVQueue, "scores", "queue (SwAVQueue.scores, push)"), (S.SwAVQueue, "push", "queue (SwAVQueue.scores, push)"),
                (S, "swav_codes", "Sinkhorn codes (swav_codes)"), (S, "swav_loss", "loss (swav_loss)"),
                (Tensor, "backward", "backward (Tensor.backward)"), (torch.optim.SGD, "step", "optimiser step (SGD.step)")]


# ---- contender: lightly
class PILImages(torch.utils.data.Dataset):
    "Images as PIL images through a per-image transform, like a torchvision dataset"
    def __init__(self, images: Tensor, transform): self.images, self.transform = images, transform
    def __len__(self): return len(self.images)
    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i].permute(1, 2, 0).numpy()))


def lightly_transform(a: argparse.Namespace):
    "lightly's SwaV multi-crop transform with the crops of the run (its other defaults are the official recipe)"
    from lightly.transforms.swav_transform import SwaVTransform
    return SwaVTransform(crop_sizes=tuple(a.crop_sizes), crop_counts=tuple(a.num_crops),
                         crop_min_scales=MIN_SCALES, crop_max_scales=MAX_SCALES)


class Lightly:
    "lightly's SwaV, as in its `examples/pytorch/swav_queue.py` (queues) and `examples/pytorch/swav.py`"
    def __init__(self, a: argparse.Namespace, images: Tensor, queue: int, name: str = "lightly"):
        from lightly.loss import SwaVLoss
        from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
        from lightly.models.modules.memory_bank import MemoryBankModule
        from self_supervised_swav.layers import encoder_feature_dim
        self.name, self.a = name, a
        self.ds = PILImages(images, lightly_transform(a))
        torch.manual_seed(a.seed)
        self.backbone = make_encoder(a)
        self.head = SwaVProjectionHead(encoder_feature_dim(self.backbone), a.hidden, 128)
        self.prototypes = SwaVPrototypes(128, n_prototypes=a.n_protos)
        self.queues = nn.ModuleList([MemoryBankModule(size=(queue, 128)) for _ in range(a.num_crops[0])]) if queue else None
        self.model = to_format(nn.ModuleList([self.backbone, self.head, self.prototypes, *(self.queues or [])]).to(a.device), a)
        self.criterion = SwaVLoss()
        self.opt = sgd(self.model.parameters())

    def _subforward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.backbone(x).flatten(start_dim=1)), dim=1, p=2)

    def _step(self, views: list[Tensor]):
        self.prototypes.normalize()
        n_high = self.a.num_crops[0]
        high = [self._subforward(x) for x in views[:n_high]]
        low = [self._subforward(x) for x in views[n_high:]]
        queue = None
        if self.queues is not None:
            with torch.no_grad():
                queue = [self.prototypes(q(f, update=True)[1].permute(1, 0)) for q, f in zip(self.queues, high)]
        loss = self.criterion([self.prototypes(f) for f in high], [self.prototypes(f) for f in low], queue)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()

    def run(self, n: int) -> list[float]:
        loader = torch.utils.data.DataLoader(self.ds, batch_size=self.a.bs, shuffle=True, drop_last=True,
                                             num_workers=self.a.workers)
        it, laps = iter(loader), Laps(self.a.device)
        for _ in range(n):
            self._step([to_format(v.to(self.a.device, non_blocking=True), self.a) for v in next(it)])
            laps.lap()
        del it
        return laps.times


# ---- contender: the floor
class Floor:
    "The project's model forward and backward on crops made beforehand, cross-entropy to fixed labels, the optimiser step"
    def __init__(self, a: argparse.Namespace, images: Tensor, queue: int = 0, name: str = "floor"):
        self.name, self.a = name, a
        self.model = make_swav_model(a)
        multi_crop = swav_augs(a)
        with torch.no_grad():
            batches = [images[i * a.bs:(i + 1) * a.bs].to(a.device).float().div_(255) for i in range(2)]
            self.crops = [[to_format(c, a) for c in multi_crop(x)] for x in batches]
        self.targets = torch.randint(a.n_protos, (sum(a.num_crops) * a.bs,), generator=torch.Generator().manual_seed(2)).to(a.device)
        self.opt = sgd(self.model.parameters())

    def run(self, n: int) -> list[float]:
        laps = Laps(self.a.device)
        for i in range(n):
            with autocast(self.a): emb, scores = self.model(self.crops[i % len(self.crops)])
            F.cross_entropy(scores.float() / 0.1, self.targets[: len(scores)]).backward()
            self.opt.step()
            self.opt.zero_grad()
            laps.lap()
        return laps.times


# ---- contender: the original fastai library
ORIGINAL_MISSING = "the original library is not installed: its rows skipped (pip install bench/wheels/self_supervised-1.0.4-py3-none-any.whl)"


def original_available() -> bool: return importlib.util.find_spec("self_supervised") is not None


def original_augs(a: argparse.Namespace) -> list:
    "The original library's pipelines for the run's crops, set to the official recipe as far as its options go"
    from self_supervised.vision.swav import get_swav_aug_pipelines
    # its blur draws an integer sigma s in blur_s and uses a kernel of int(s / 4) * 2 + 1 px: (4, 12) gives the 3-5 px
    # kernels the project's blur uses at these sizes (its default (4, 32) would blur with kernels up to 15 px)
    return get_swav_aug_pipelines(num_crops=list(a.num_crops), crop_sizes=list(a.crop_sizes), min_scales=list(MIN_SCALES),
                                  max_scales=list(MAX_SCALES), rotate=False, jitter_s=1.0, jitter_p=0.8, bw_p=0.2,
                                  blur_p=0.5, blur_s=(4, 12), flip_p=0.5, cuda=a.device.type == "cuda")


class Original:
    "The original fastai `self_supervised` 1.0.4: its `create_swav_model`, `SWAV` callback and kornia/torchvision pipelines"
    def __init__(self, a: argparse.Namespace, images: Tensor, queue: int, name: str = "original"):
        from self_supervised.layers import PoolingType, create_timm_encoder   # its create_encoder breaks on fastai 2.8
        from self_supervised.vision.swav import SWAV, create_swav_model
        self.name, self.a = name, a
        torch.manual_seed(a.seed)
        encoder = create_timm_encoder(a.arch, pretrained=False, pool_type=PoolingType.Avg)
        self.model = to_format(create_swav_model(encoder, hidden_size=a.hidden, projection_size=128, n_protos=a.n_protos).to(a.device), a)
        swav = SWAV(original_augs(a), CROP_IDS, K=queue or None, queue_start_pct=0.)   # its queue starts full of random unit vectors
        self.learn, self.timer = fastai_learner(a, images, self.model, swav)

    run = Project.run


CLASSES = {"project": Project, "original": Original, "lightly": Lightly, "floor": Floor,
           "project-before": partial(Project, name="project-before")}   # the library before issue 14's changes
DEFAULT = ["project", "original", "lightly", "floor"]
