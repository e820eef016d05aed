"""Augmentation throughput of the full multi-crop recipe: the project's kornia batch pipelines against per-image
torchvision multi-crop, as the official SwAV code and lightly do it.

Every contender turns the same uint8 images into all crops of the recipe (by default 2 large + 6 small, the official
colour distortion, grayscale, blur, flip, normalisation) and hands back one float batch per crop:

* `project`: the `MultiCrop` of `get_swav_aug_pipelines(...)` called on the whole batch (`x.float() / 255` included),
  on `--device`, as `SWAV` calls it (`learn.swav.augs(x)`): for each declared group of identical pipelines, the
  crops of every image from kornia-sampled boxes in one `resized_crops` call, then the rest of the pipeline in one
  call on the group's crops.
* `project-ungrouped`: the same pipelines as a `MultiCrop` of one crop per group (what a plain list of pipelines
  becomes), so one call per crop: what grouping saves.
* `project-before`: the project before issue 14 (`contenders.before_augs`): kornia's crop once per crop and kornia's
  HSV hue shift, the rest as `project`.
* `original`: the original fastai library `self_supervised` 1.0.4, its `get_swav_aug_pipelines` set to the official
  recipe (`contenders.original_augs`), one call per crop as its `SWAV` callback does; its torchvision crop draws one
  box for the whole batch. Skipped when not installed.
* `official`: the official `MultiCropDataset` transform written plainly below (torchvision `RandomResizedCrop`,
  flip, `RandomApply(ColorJitter)`, `RandomGrayscale`, PIL Gaussian blur, `ToTensor`, `Normalize`), image by image
  from PIL images, then stacked into batches.
* `lightly`: lightly's `SwaVTransform`, image by image (skipped with a message when lightly is not installed).

Two settings (`--modes`): `1` one CPU thread and one process for every contender; `all`: the project with all cores
as torch threads, the per-image contenders in a `DataLoader` with one worker per core (how they are used), the first
batch of each worker dropped. Contenders are interleaved batch-round by batch-round; figures are medians over batches.

    python bench/bench_augs.py                          # CPU config: 2x64 + 6x32 px crops from 96 px images, batch 32
    python bench/bench_augs.py --config gpu --device cuda
    python bench/bench_augs.py --tiny
"""
from __future__ import annotations
import argparse
import os

import torch
from torch import Tensor

import harness as H
from contenders import (CONFIGS, MAX_SCALES, MIN_SCALES, TINY, PILImages, available, lightly_transform,
                        before_augs, make_images, original_augs, swav_augs)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)   # as in the official main_swav.py


# ---- the official recipe (facebookresearch/swav, src/multicropdataset.py), written plainly
class PILRandomGaussianBlur:
    "Blur a PIL image with probability `p`, radius uniform in [radius_min, radius_max] (official SwAV)"
    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max
    def __call__(self, img):
        from PIL import ImageFilter
        if torch.rand(()) >= self.p: return img
        radius = self.radius_min + float(torch.rand(())) * (self.radius_max - self.radius_min)
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


def official_transform(a: argparse.Namespace):
    "One image -> the list of all crops, as the official `MultiCropDataset.__getitem__`"
    import torchvision.transforms as T
    s = 1.0
    color = T.Compose([T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8), T.RandomGrayscale(p=0.2)])
    tfms = []
    for n, size, lo, hi in zip(a.num_crops, a.crop_sizes, MIN_SCALES, MAX_SCALES):
        tfms += [T.Compose([T.RandomResizedCrop(size, scale=(lo, hi)), T.RandomHorizontalFlip(p=0.5), color,
                            PILRandomGaussianBlur(), T.ToTensor(), T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])] * n
    return lambda img: [t(img) for t in tfms]


# ---- contenders
def float_batch(a, images: Tensor, i: int) -> Tensor:
    "Batch `i` of the uint8 `images` (wrapping around) on the device, as floats in [0, 1]"
    return images[(i * a.bs) % len(images):][:a.bs].to(a.device).float().div_(255)


class TimedBatches:
    "A contender timed batch by batch: `_batch(i)` makes the crops of batch `i` with `threads` torch threads"
    def run(self, n: int) -> list[float]:
        with H.torch_threads(self.threads): return H.time_each(self._batch, n, self.a.device)


class ProjectAugs(TimedBatches):
    "The project's `MultiCrop` on whole batches: its declared groups (`grouped`), or one group per crop"
    def __init__(self, a, images: Tensor, threads: int, grouped: bool = True, before: bool = False):
        from self_supervised_swav.augmentations import MultiCrop
        self.a, self.images, self.threads = a, images, threads
        self.name = "project-before" if before else "project" if grouped else "project-ungrouped"
        multi_crop = before_augs(a) if before else swav_augs(a)
        self.multi_crop = multi_crop if grouped else MultiCrop(list(multi_crop))   # groups=None: one call per pipeline
    def _batch(self, i: int) -> list[Tensor]: return self.multi_crop(float_batch(self.a, self.images, i))


class OriginalAugs(TimedBatches):
    "The original library's pipelines (`contenders.original_augs`), one call per crop on the batch, as its `SWAV.before_batch`"
    def __init__(self, a, images: Tensor, threads: int):
        self.a, self.images, self.threads, self.name = a, images, threads, "original"
        self.augs = original_augs(a)
    def _batch(self, i: int) -> list[Tensor]:
        from fastai.torch_core import TensorImage   # its Normalize acts on TensorImage only, as its DataLoaders give
        x = TensorImage(float_batch(self.a, self.images, i))
        return [aug(x) for aug in self.augs]


class PerImageAugs:
    "A per-image multi-crop transform, in this process (`workers=0`) or in DataLoader workers"
    def __init__(self, name: str, a, images: Tensor, transform, workers: int):
        self.name, self.a, self.workers = name, a, workers
        self.ds = PILImages(images, transform)
    def _batch(self, i: int) -> list[Tensor]:
        views = [self.ds[(i * self.a.bs + j) % len(self.ds)] for j in range(self.a.bs)]
        return [torch.stack(c) for c in zip(*views)]
    def run(self, n: int) -> list[float]:
        if self.workers == 0:
            with H.torch_threads(1): return H.time_each(self._batch, n, torch.device("cpu"))
        it = iter(torch.utils.data.DataLoader(self.ds, batch_size=self.a.bs, shuffle=True, num_workers=self.workers))
        for _ in range(self.workers): next(it)   # each worker's first batch: start-up
        laps = H.Laps(torch.device("cpu"))
        for _ in range(n): next(it); laps.lap()
        del it
        return laps.times


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="cpu", choices=list(CONFIGS), help="Crop sizes, batch and image side (bench_step.CONFIGS)")
    p.add_argument("--device", default="cpu", help="Device of the project's pipelines: cpu or cuda")
    p.add_argument("--bs", type=int, help="Images per batch; default from --config")
    p.add_argument("--modes", default="1,all", help="1: one thread/process each; all: all cores (see the docstring)")
    p.add_argument("--batches", type=int, default=3, help="Timed batches per round and contender")
    p.add_argument("--rounds", type=int, default=6, help="Interleaved rounds (the order of the contenders rotates)")
    p.add_argument("--contenders", default="project,project-before,project-ungrouped,original,official,lightly",
                   help="Comma-separated subset of project, project-before, project-ungrouped, original, official, lightly (project is always run: "
                   "the ratios are to it)")
    p.add_argument("--json", help="Also write the results to this JSON file")
    p.add_argument("--tiny", action="store_true", help="A seconds-long configuration, to check the script runs")
    a = p.parse_args(argv)
    cfg = dict(CONFIGS[a.config])
    if a.tiny: cfg.update(TINY); a.batches, a.rounds, a.modes = 2, 1, "1"
    for k, v in cfg.items():
        if getattr(a, k, None) is None: setattr(a, k, v)
    a.device = torch.device(a.device)
    return a


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    cores = os.cpu_count() or 1
    images = make_images(a.bs * (a.batches + cores), a.img_size)   # enough for the workers' dropped first batches
    names = available(list(dict.fromkeys(["project", *[c for c in a.contenders.split(",") if c]])))
    rows = []
    for mode in a.modes.split(","):
        threads, workers = (1, 0) if mode == "1" else (cores, cores)
        make = {"project": lambda: ProjectAugs(a, images, threads),
                "project-ungrouped": lambda: ProjectAugs(a, images, threads, grouped=False),
                "project-before": lambda: ProjectAugs(a, images, threads, before=True),
                "original": lambda: OriginalAugs(a, images, threads),
                "official": lambda: PerImageAugs("official", a, images, official_transform(a), workers),
                "lightly": lambda: PerImageAugs("lightly", a, images, lightly_transform(a), workers)}
        times = H.run_interleaved([f() for n, f in make.items() if n in names], a.rounds, a.batches, label=f"mode {mode}, ")
        for name, rounds in times.items():
            ms = H.median_ms(H.flat(rounds))
            rows.append(dict(mode=mode, contender=name, batch_ms=ms, img_per_s=1e3 * a.bs / ms,
                             speedup=H.paired_ratio(rounds, times["project"])))
    report(a, rows)
    H.write_json(a.json, a, rows)
    return rows


def report(a, rows: list[dict]):
    crops = " + ".join(f"{n}x{s}" for n, s in zip(a.num_crops, a.crop_sizes))
    print(f"Multi-crop augmentation ({crops} px crops from {a.img_size} px images, batch {a.bs}), project on {a.device}, "
          f"{os.cpu_count()} cores: median of {a.batches} batches x {a.rounds} interleaved rounds")
    print("time / project's: median over rounds of (this contender's time / the project's) within the round; > 1: project faster")
    H.print_table(["mode", "contender", "ms per batch", "source images/s", "time / project's"],
                  [[r["mode"], r["contender"], f"{r['batch_ms']:.0f}", f"{r['img_per_s']:.0f}", f"{r['speedup']:.2f}"] for r in rows])


if __name__ == "__main__": main()
