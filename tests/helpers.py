"""Helpers shared by the tests and the benchmark scripts (`bench/` puts `tests/` on `sys.path`): one copy of each.

* `official_sinkhorn`, `official_sinkhorn_in_dtype`, `official_swav_loss`: re-exported from the library's
  `self_supervised_swav.reference` (the official formulas of facebookresearch/swav, written plainly);
* `tiny_encoder` / `tiny_swav_model`: a 2-conv SwAV model that trains in milliseconds on CPU;
* `tiny_pipelines`: multi-crop pipelines without colour or blur (gray digits), 2 large + 2 small crops;
* `run_gloo` / `save_result`: run a function in several gloo processes and collect what each rank saved.
"""
from __future__ import annotations
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from self_supervised_swav.reference import official_sinkhorn, official_sinkhorn_in_dtype, official_swav_loss  # noqa: F401 (re-exported)
from self_supervised_swav.swav import create_swav_model, get_swav_aug_pipelines

START_METHOD = os.environ.get("SWAV_TEST_START_METHOD", "fork")


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


def tiny_pipelines(sizes: tuple[int, int] = (16, 8), num_crops: tuple[int, int] = (2, 2), **kwargs):
    "Multi-crop pipelines for gray digits: no colour, no blur, no normalisation"
    kw = dict(rotate=False, jitter=False, bw=False, blur=False, stats=None) | kwargs
    return get_swav_aug_pipelines(num_crops=list(num_crops), crop_sizes=list(sizes), min_scales=[0.25, 0.05],
                                  max_scales=[1., 0.3], **kw)


# ---- gloo process groups
def _entry(rank: int, fn, world: int, store: str, args: tuple, timeout: float):
    "Body of one process: RANK/WORLD_SIZE as torchrun sets them (fastai reads them), join the gloo group, run `fn`, leave"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    try: fn(rank, world, *args)
    finally: dist.destroy_process_group()


def start_gloo(fn, out_dir: Path, *args, world: int = 2, timeout: float = 90) -> None:
    "Run `fn(rank, world, out_dir, *args)` in `world` gloo processes and wait for them (killed after `timeout` s)"
    ctx = mp.start_processes(_entry, args=(fn, world, str(Path(out_dir) / "store"), (out_dir, *args), timeout), nprocs=world,
                             join=False, start_method=START_METHOD)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive(): p.kill()
            raise TimeoutError(f"{fn.__name__} did not finish in {timeout} s")


def run_gloo(fn, out_dir: Path, *args, world: int = 2, timeout: float = 90) -> list:
    "`start_gloo`, then what each rank saved with `save_result`, rank by rank"
    start_gloo(fn, out_dir, *args, world=world, timeout=timeout)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def save_result(out_dir: Path, rank: int, **results):
    "Save this rank's results for `run_gloo`"
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
