"""Full SwAV training step: this project (fastai `Learner` + `SWAV` callback) against lightly and a floor.

A step is everything one batch costs: fetching it, making all crops (augmentation), the forward pass of every crop,
Sinkhorn codes, the swapped-prediction loss, backward and the optimiser step. Three contenders train the same encoder
(timm `resnet18`, no pretrained weights) on the same images with the same optimiser (SGD, momentum 0.9) and crops:

* `project`: `Learner(dls, create_swav_model(...), cbs=SWAV(get_swav_aug_pipelines(...), ...))`, `learn.fit`: uint8 images,
  `IntToFloatTensor`, kornia batch augmentation in the callback, as a user runs it.
* `lightly`: lightly's `SwaVProjectionHead`, `SwaVPrototypes`, `SwaVLoss`, `MemoryBankModule` queues and its per-image
  `SwaVTransform` in `DataLoader` workers, wired as in lightly's `examples/pytorch/swav_queue.py` (one encoder call per
  crop). Skipped with a message when lightly is not installed.
* `floor`: the project's model forward (encoder, projector, prototypes) and backward on crops made beforehand, with a
  cross-entropy to fixed random labels, and the optimiser step: what any SwAV implementation pays at least.

Each contender runs `--warmup + --steps` steps per round; rounds are interleaved, the order of the contenders rotating
each round, so that load from other processes hits all alike. Step times are medians over all rounds' timed steps;
ratios (`project/lightly` throughput, `project/floor` step time) are medians over rounds of the ratio within a round,
so that load drifting between rounds cancels, and are only meaningful within one run. Step time is the time between
the ends of consecutive steps, so it includes waiting for the next batch.

    python bench/bench_step.py                        # CPU config: 2x64 + 6x32 px crops, batch 32, queue on and off
    python bench/bench_step.py --config gpu --device cuda   # 2x224 + 6x96 px, batch 256
    python bench/bench_step.py --memory               # peak memory: each contender alone in a fresh process
    python bench/bench_step.py --profile              # phase times, torch.profiler tables (and syncs on cuda)
    python bench/bench_step.py --tiny                 # seconds (plus imports): what tests/test_bench.py runs
"""
from __future__ import annotations
import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

CONFIGS = {   # crop sizes/counts, batch, source image side, queue length per assignment crop when the queue is on
    "cpu": dict(bs=32, crop_sizes=(64, 32), num_crops=(2, 6), img_size=96, queue=480, workers=2),
    "gpu": dict(bs=256, crop_sizes=(224, 96), num_crops=(2, 6), img_size=256, queue=3840, workers=8),
}
MIN_SCALES, MAX_SCALES = (0.14, 0.05), (1.0, 0.14)   # official SwAV multi-crop scales, for every contender
CROP_IDS = [0, 1]
CONTENDERS = ("project", "lightly", "floor")


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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="Also write the results to this JSON file")
    p.add_argument("--tiny", action="store_true", help="A seconds-long configuration, to check the script runs")


def finish_args(a: argparse.Namespace) -> argparse.Namespace:
    "Fill the defaults that depend on --config and --tiny"
    cfg = dict(CONFIGS[a.config])
    if a.tiny:
        cfg.update(bs=4, crop_sizes=(16, 8), img_size=20, queue=8, workers=0)
        a.steps, a.warmup, a.rounds, a.n_protos, a.hidden = 2, 1, 1, 20, 32
    if a.small_crops is not None: cfg["num_crops"] = (cfg["num_crops"][0], a.small_crops)
    for k, v in cfg.items():
        if getattr(a, k, None) is None: setattr(a, k, v)
    if a.threads: torch.set_num_threads(a.threads)
    a.device = torch.device(a.device)
    return a


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--workers", type=int, help="lightly's DataLoader workers; default from --config")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="Comma-separated subset of " + ",".join(CONTENDERS))
    p.add_argument("--queue-modes", default="off,on", help="Comma-separated: off (no queue) and/or on (a full queue)")
    p.add_argument("--memory", action="store_true", help="Peak memory: run each contender alone in a fresh process")
    p.add_argument("--profile", action="store_true", help="Print a torch.profiler table of the project's steps")
    p.add_argument("--only", help=argparse.SUPPRESS)   # internal: one contender in this process (--memory)
    return finish_args(p.parse_args(argv))


# ---- timing
def sync(device: torch.device):
    "Wait for the device, so that a timestamp covers the work queued before it"
    if device.type == "cuda": torch.cuda.synchronize(device)


def median_ms(times: list[float]) -> float: return 1e3 * statistics.median(times)


def rss_mib() -> float:
    "Current resident set size of this process in MiB"
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---- data and models shared by the contenders
def make_images(n: int, size: int, seed: int = 0) -> Tensor:
    "`n` smooth random uint8 RGB images `[n, 3, size, size]` (upsampled noise: blur and jitter see real structure)"
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, max(2, size // 8), max(2, size // 8), generator=g)
    return (F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def n_images(a: argparse.Namespace) -> int:
    "Enough images for a round without repeats, and at least the queue length (`SWAV` checks K <= dataset size)"
    return max(a.bs * (a.warmup + a.steps), a.queue, 2 * a.bs)


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
    if not a.channels_last: return t
    if isinstance(t, Tensor) and t.ndim != 4: return t
    return t.to(memory_format=torch.channels_last)


def swav_augs(a: argparse.Namespace) -> list:
    from self_supervised_swav.swav import get_swav_aug_pipelines
    return get_swav_aug_pipelines(num_crops=list(a.num_crops), crop_sizes=list(a.crop_sizes),
                                  min_scales=list(MIN_SCALES), max_scales=list(MAX_SCALES))


def sgd(params, lr: float = 0.05): return torch.optim.SGD(params, lr=lr, momentum=0.9)


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
        def __init__(self): self.n, self.times = 0, []
        def before_train(self): sync(device); self.times, self.t = [], time.perf_counter()
        def after_batch(self):
            sync(device); t = time.perf_counter()
            self.times.append(t - self.t); self.t = t
            if len(self.times) >= self.n: raise CancelEpochException()
        def before_validate(self): raise CancelValidException()
    return StepTimer()


class _ChannelsLast:
    "Callback putting the crops in channels_last (the model is converted beforehand)"
    @staticmethod
    def make():
        from fastai.callback.core import Callback
        class ChannelsLastCrops(Callback):
            order = 11   # after SWAV (9) made the crops
            def before_batch(self): self.learn.xb = ([c.contiguous(memory_format=torch.channels_last) for c in self.xb[0]],)
        return ChannelsLastCrops()


class Project:
    "The project as a user runs it: `Learner` + `SWAV`, `learn.fit(1)` for each round"
    def __init__(self, a: argparse.Namespace, images: Tensor, queue: int, name: str = "project"):
        from fastai.callback.progress import ProgressCallback  # noqa: F401  (adds Learner.no_bar)
        from fastai.data.core import DataLoaders, TfmdDL
        from fastai.data.transforms import IntToFloatTensor
        from fastai.learner import Learner
        from fastai.optimizer import OptimWrapper
        from self_supervised_swav.swav import SWAV
        self.name, self.a = name, a
        ds = _ImageDataset(images)
        dl = partial(TfmdDL, ds, bs=a.bs, shuffle=True, drop_last=True, after_batch=[IntToFloatTensor()], device=a.device,
                     num_workers=0)   # batches are slices of a uint8 tensor: workers would only add start-up time per fit
        self.model = make_swav_model(a)
        if queue: fill_queue(self.model, queue, len(CROP_IDS))
        self.timer = _step_timer_cb(a.device)
        cbs = [SWAV(swav_augs(a), CROP_IDS, K=queue or None, queue_start_pct=0., freeze_protos_iters=0), self.timer]
        if a.channels_last: cbs.append(_ChannelsLast.make())
        self.learn = Learner(DataLoaders(dl(), dl(), device=a.device), self.model, loss_func=_set_by_swav, cbs=cbs,
                             opt_func=partial(OptimWrapper, opt=torch.optim.SGD, momentum=0.9), lr=0.05)

    def run(self, n: int) -> list[float]:
        self.timer.n = n
        with self.learn.no_bar(), self.learn.no_logging(): self.learn.fit(1)
        return self.timer.times


def _set_by_swav(*_):
    "Placeholder loss: `SWAV` sets `learn.loss_func` for the fit and restores this one after"
    raise RuntimeError("SWAV should have replaced the loss function")


def fill_queue(model: nn.Module, queue: int, n_queues: int):
    "A full queue of random unit embeddings, so that it enters Sinkhorn from the first step (lightly's queues start so)"
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(n_queues, queue, model.prototypes.in_features, generator=g), dim=-1)
    model.queue = q.to(model.prototypes.weight.device)
    model.queue_len.fill_(queue)


# ---- contender: lightly
def lightly_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("lightly") is not None


LIGHTLY_MISSING = "lightly is not installed: lightly rows skipped (pip install lightly, see bench/README.md)"


class _PILDataset(torch.utils.data.Dataset):
    "Images as PIL images through a per-image transform, like a torchvision dataset"
    def __init__(self, images: Tensor, transform): self.images, self.transform = images, transform
    def __len__(self): return len(self.images)
    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i].permute(1, 2, 0).numpy())), 0


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
        self.name, self.a = name, a
        self.ds = _PILDataset(images, lightly_transform(a))
        torch.manual_seed(a.seed)
        self.backbone = make_encoder(a)
        from self_supervised_swav.layers import encoder_feature_dim
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
        times, it = [], iter(loader)
        sync(self.a.device); t = time.perf_counter()
        for _ in range(n):
            views, _ = next(it)
            self._step([to_format(v.to(self.a.device, non_blocking=True), self.a) for v in views])
            sync(self.a.device); now = time.perf_counter()
            times.append(now - t); t = now
        del it
        return times


# ---- contender: the floor
class Floor:
    "The project's model forward and backward on crops made beforehand, cross-entropy to fixed labels, the optimiser step"
    def __init__(self, a: argparse.Namespace, images: Tensor, queue: int = 0, name: str = "floor"):
        self.name, self.a = name, a
        self.model = make_swav_model(a)
        augs = swav_augs(a)
        with torch.no_grad():
            batches = [images[i * a.bs:(i + 1) * a.bs].to(a.device).float().div_(255) for i in range(2)]
            self.crops = [[to_format(aug(x), a) for aug in augs] for x in batches]
        self.targets = torch.randint(a.n_protos, (sum(a.num_crops) * a.bs,), generator=torch.Generator().manual_seed(2)).to(a.device)
        self.opt = sgd(self.model.parameters())

    def run(self, n: int) -> list[float]:
        times = []
        sync(self.a.device); t = time.perf_counter()
        for i in range(n):
            emb, scores = self.model(self.crops[i % len(self.crops)])
            loss = F.cross_entropy(scores.float() / 0.1, self.targets[: len(scores)])
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()
            sync(self.a.device); now = time.perf_counter()
            times.append(now - t); t = now
        return times


CLASSES = dict(project=Project, lightly=Lightly, floor=Floor)


# ---- running and reporting
def run_interleaved(contenders: list, a: argparse.Namespace) -> dict[str, list[list[float]]]:
    "All contenders `a.rounds` times in turn, the order rotating each round; each round's first `a.warmup` steps dropped"
    times = {c.name: [] for c in contenders}
    for r in range(a.rounds):
        for c in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:
            times[c.name].append(c.run(a.warmup + a.steps)[a.warmup:])
        print(f"  round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {median_ms(v[-1]):.0f} ms" for k, v in times.items()),
              file=sys.stderr, flush=True)
    return times


def flat(rounds: list[list[float]]) -> list[float]: return [t for ts in rounds for t in ts]


def paired_ratio(num: list[list[float]], den: list[list[float]]) -> float:
    "Median over rounds of (median step time of `num` / that of `den`) within the round: slow drifts of load cancel"
    return statistics.median(statistics.median(n) / statistics.median(d) for n, d in zip(num, den))


def describe(a: argparse.Namespace) -> str:
    crops = " + ".join(f"{n}x{s}" for n, s in zip(a.num_crops, a.crop_sizes))
    return (f"{a.arch}, crops {crops} px from {a.img_size} px images, batch {a.bs}, n_protos {a.n_protos}, "
            f"device {a.device}, {torch.get_num_threads()} torch threads on {os.cpu_count()} cores, "
            f"lightly workers {a.workers}{', channels_last' if a.channels_last else ''}; "
            f"median of {a.steps} steps x {a.rounds} interleaved rounds after {a.warmup} warm-up step(s) each")


def bench_speed(a: argparse.Namespace) -> list[dict]:
    names = [c for c in a.contenders.split(",") if c]
    if "lightly" in names and not lightly_available():
        print(LIGHTLY_MISSING); names.remove("lightly")
    images = make_images(n_images(a), a.img_size, a.seed)
    rows = []
    for mode in [m for m in a.queue_modes.split(",") if m]:
        queue = a.queue if mode == "on" else 0
        contenders = [CLASSES[n](a, images, queue) for n in names]
        print(f"queue {mode}{f' ({queue} per assignment crop)' if queue else ''}:", file=sys.stderr, flush=True)
        times = run_interleaved(contenders, a)
        for name, rounds in times.items():
            ts = flat(rounds)
            ms = median_ms(ts)
            ratios = {f"time_vs_{ref}": paired_ratio(rounds, times[ref]) for ref in ("lightly", "floor") if ref in times}
            rows.append(dict(queue=queue, contender=name, step_ms=ms, img_per_s=1e3 * a.bs / ms,
                             spread_pct=100 * (max(ts) - min(ts)) / statistics.median(ts), **ratios))
    return rows


def report_speed(a: argparse.Namespace, rows: list[dict]):
    print(f"Full SwAV step: {describe(a)}")
    print("Ratios are medians over rounds of the ratio within each round (paired: load changes between rounds cancel).")
    print("| queue | contender | step ms | images/s | spread % | throughput / lightly's | step time / floor's |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vs_l = f"{1 / r['time_vs_lightly']:.2f}" if "time_vs_lightly" in r else "-"
        vs_f = f"{r['time_vs_floor']:.2f}" if "time_vs_floor" in r else "-"
        print(f"| {r['queue'] or 'off'} | {r['contender']} | {r['step_ms']:.0f} | {r['img_per_s']:.1f} | "
              f"{r['spread_pct']:.0f} | {vs_l} | {vs_f} |")


def bench_one_memory(a: argparse.Namespace) -> dict:
    "Internal (--only): train one contender here and return its peak memory"
    base = rss_mib()
    images = make_images(n_images(a), a.img_size, a.seed)
    queue = a.queue if a.queue_modes == "on" else 0
    c = CLASSES[a.only](a, images, queue)
    if a.device.type == "cuda": torch.cuda.reset_peak_memory_stats(a.device)
    setup = rss_mib()
    times = c.run(a.warmup + a.steps)[a.warmup:]
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    res = dict(contender=a.only, queue=queue, base_mib=base, setup_mib=setup, max_rss_mib=own, growth_mib=own - setup,
               worker_max_rss_mib=kids if a.only == "lightly" and a.workers else 0., step_ms=median_ms(times))
    if a.device.type == "cuda": res["cuda_peak_mib"] = torch.cuda.max_memory_allocated(a.device) / 2**20
    return res


def bench_memory(a: argparse.Namespace, argv: list[str]) -> list[dict]:
    "Each contender alone in a fresh process (queue on), so that peaks do not mix"
    names = [c for c in a.contenders.split(",") if c]
    if "lightly" in names and not lightly_available():
        print(LIGHTLY_MISSING); names.remove("lightly")
    rows = []
    strip = {"--memory", "--json", "--queue-modes", "--contenders", "--rounds"}
    args, skip = [], False
    for x in argv:   # the user's other options, passed on
        if skip: skip = False; continue
        if x.split("=")[0] in strip: skip = "=" not in x and x not in ("--memory",); continue
        args.append(x)
    for n in names:
        out = subprocess.run([sys.executable, __file__, *args, "--only", n, "--queue-modes", "on", "--rounds", "1"],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def report_memory(a: argparse.Namespace, rows: list[dict]):
    print(f"Peak memory of the step (queue on, each contender alone in a fresh process, {a.warmup} + {a.steps} steps): "
          + describe(a).split("; median")[0])
    print("| contender | RSS with torch imported MiB | after setup MiB | max RSS MiB | growth in steps MiB | max worker RSS MiB |"
          + (" CUDA peak MiB |" if a.device.type == "cuda" else ""))
    print("|---|---|---|---|---|---|" + ("---|" if a.device.type == "cuda" else ""))
    for r in rows:
        print(f"| {r['contender']} | {r['base_mib']:.0f} | {r['setup_mib']:.0f} | {r['max_rss_mib']:.0f} | "
              f"{r['growth_mib']:.0f} | {r['worker_max_rss_mib']:.0f} |"
              + (f" {r['cuda_peak_mib']:.0f} |" if "cuda_peak_mib" in r else ""))
    ref = {r["contender"]: r for r in rows}
    if "project" in ref and "lightly" in ref:
        print(f"project/lightly max RSS: {ref['project']['max_rss_mib'] / ref['lightly']['max_rss_mib']:.2f} "
              f"(main process; lightly's workers hold their own copies on top)")


PHASES = [("SWAV", "_make_crops", "augmentation (SWAV._make_crops)"),
          ("SwAVModel", "forward", "model forward"),
          ("SWAV", "_swav_loss", "Sinkhorn + loss + queue (SWAV._swav_loss)"),
          ("Learner", "_backward", "backward"), ("Learner", "_step", "optimiser step")]


@contextlib.contextmanager
def _phase_hooks(wrap):
    "Wrap the step's phases (see PHASES) with `wrap(label, f)` while the block runs"
    from fastai.learner import Learner
    from self_supervised_swav import swav as S
    owners = dict(SWAV=S.SWAV, SwAVModel=S.SwAVModel, Learner=Learner)
    saved = [(owners[o], k, getattr(owners[o], k)) for o, k, _ in PHASES]
    for (o, k, f), (_, _, label) in zip(saved, PHASES): setattr(o, k, wrap(label, f))
    try: yield
    finally:
        for o, k, f in saved: setattr(o, k, f)


def phase_times(c: "Project", a: argparse.Namespace) -> dict[str, float]:
    "Share of the step (%) of each phase, timed with perf_counter (no profiler overhead): median over rounds"
    acc = {}
    def wrap(label, f):
        def g(*args, **kwargs):
            sync(a.device); t = time.perf_counter()
            try: return f(*args, **kwargs)
            finally: sync(a.device); acc[label] = acc.get(label, 0.) + time.perf_counter() - t
        return g
    shares, whole = {label: [] for *_, label in PHASES}, []
    with _phase_hooks(wrap):
        for _ in range(a.rounds):
            ts = c.run(a.warmup + a.steps)
            whole += ts[a.warmup:]
            for label in shares: shares[label].append(100 * acc.pop(label, 0.) / sum(ts))
    res = {label: statistics.median(v) for label, v in shares.items()}
    res["rest: data, fastai, callbacks"] = 100 - sum(res.values())
    return res, median_ms(whole)


def count_syncs(c: "Project", a: argparse.Namespace) -> float:
    "Synchronising CUDA calls per step (`torch.cuda.set_sync_debug_mode`), each phase's count printed too"
    counts = {}
    def wrap(label, f):
        def g(*args, **kwargs):
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                try: return f(*args, **kwargs)
                finally: counts[label] = counts.get(label, 0) + sum("synchroniz" in str(x.message) for x in w)
        return g
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with _phase_hooks(wrap), warnings.catch_warnings(record=True) as rest:
            warnings.simplefilter("always")
            c.run(a.warmup + a.steps)
        counts["outside these phases (data, fastai)"] = sum("synchroniz" in str(x.message) for x in rest)
    finally: torch.cuda.set_sync_debug_mode("default")
    n = a.warmup + a.steps
    print("| phase | syncs per step |\n|---|---|")
    for label, k in counts.items(): print(f"| {label} | {k / n:.1f} |")
    return sum(counts.values()) / n


def profile_project(a: argparse.Namespace, rows: int = 25):
    "The project's step (queue on): phase times without profiler, then torch.profiler operator tables"
    images = make_images(n_images(a), a.img_size, a.seed)
    from torch.profiler import ProfilerActivity, profile, record_function
    c = Project(a, images, a.queue)
    print(f"Project step, queue {a.queue}: {describe(a)}")
    shares, step_ms = phase_times(c, a)
    print(f"Phases (timed without profiler; % of the round's time, median over rounds; step {step_ms:.0f} ms):")
    print("| phase | % of step | ms per step |\n|---|---|---|")
    for label, pct in shares.items(): print(f"| {label} | {pct:.1f} | {pct * step_ms / 100:.0f} |")
    if a.device.type == "cuda": print(f"\nHost-device syncs per step: {count_syncs(c, a):.0f}")
    def labelled(label, f):
        def g(*args, **kwargs):
            with record_function("phase: " + label): return f(*args, **kwargs)
        return g
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device.type == "cuda" else [])
    with _phase_hooks(labelled), profile(activities=acts, record_shapes=True) as prof: c.run(a.steps)
    print(f"\ntorch.profiler over {a.steps} steps (its overhead inflates op-heavy Python code such as kornia's):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=55))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows,
                                                             max_name_column_width=40, max_shapes_column_width=60))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    if a.only:
        print(json.dumps(bench_one_memory(a))); return
    if a.profile: profile_project(a); return
    if a.memory:
        rows = bench_memory(a, argv); report_memory(a, rows)
    else:
        rows = bench_speed(a); report_speed(a, rows)
    if a.json:
        with open(a.json, "w") as f: json.dump(dict(args={k: str(v) for k, v in vars(a).items()}, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__": main()
