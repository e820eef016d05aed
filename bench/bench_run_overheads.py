"""What a long run of `swav_pretrain` pays besides training: the start-up on a large folder, and one checkpoint per epoch.

* start-up: `image_files` (which reads the sizes of at most 1,000 sampled images, not of every file) and the fastai
  `DataLoaders` of `folder_dls` on a folder of `--n_files` small PNGs (made once, in `--folder`);
* checkpoint: `save_checkpoint` of the demo's model (resnet10t, 14 prototypes, Adam state) after one epoch, against
  the time of that epoch.

    python bench/bench_run_overheads.py --n_files 100000 --folder /tmp/many_pngs
"""
from __future__ import annotations
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import harness as H   # noqa: F401  (quiets warnings)
import torch
from PIL import Image
from fastai.learner import Learner
import fastai.callback.progress  # noqa: F401  (Learner.no_bar)

from self_supervised_swav.checkpoint import save_checkpoint
from self_supervised_swav.data import embedded_dls, folder_dls, folder_labels, image_files
from self_supervised_swav.layers import create_encoder
from self_supervised_swav.swav import SWAV, create_swav_model, get_swav_aug_pipelines


def make_folder(folder: Path, n: int):
    "`n` small PNGs of mixed sizes in 10 class sub-folders (kept: made once)"
    done = len(list(folder.glob("*/*.png"))) if folder.exists() else 0
    g = torch.Generator().manual_seed(0)
    for i in range(done, n):
        side = 16 + i % 17
        arr = (torch.rand(side, side, generator=g) * 255).to(torch.uint8).numpy()
        d = folder / f"c{i % 10}"; d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(d / f"{i:06d}.png")


def startup(folder: Path, bs: int) -> dict:
    "Seconds to list and sample the folder, and to build its DataLoaders"
    t0 = time.perf_counter()
    files, smallest = image_files(folder)
    t1 = time.perf_counter()
    dls = folder_dls(folder, files, folder_labels(folder, files), 24, bs, 0.2, 0, gray=True, num_workers=0)
    t2 = time.perf_counter()
    return dict(n_files=len(files), list_and_sample_s=round(t1 - t0, 2), dataloaders_s=round(t2 - t1, 2), n_train=len(dls.train.dataset))


def checkpoint_cost(out: Path, repeats: int) -> dict:
    "The demo's model and optimiser after one epoch: median seconds of `save_checkpoint`, and of that epoch"
    dls = embedded_dls(24, 64)
    augs = get_swav_aug_pipelines(num_crops=[2, 2], crop_sizes=[24, 12], min_scales=[0.6, 0.35], max_scales=[1., 0.6], stats=None)
    learn = Learner(dls, create_swav_model(create_encoder("resnet10t", pretrained=False, n_in=1), n_protos=14),
                    cbs=SWAV(augs, [0, 1], K=None, freeze_protos_iters=22))
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    epoch = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); save_checkpoint(learn, out / "checkpoint.pth", 0, 1, dict(demo=True)); times.append(time.perf_counter() - t)
    ckpt = statistics.median(times)
    return dict(epoch_s=round(epoch, 2), checkpoint_s=round(ckpt, 3), checkpoint_mib=round((out / "checkpoint.pth").stat().st_size / 2**20, 1),
                checkpoint_share_of_epoch=round(ckpt / epoch, 4))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_files", type=int, default=100_000)
    p.add_argument("--folder", default=None, help="where the PNGs are made (and kept); default: a temporary folder")
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="200 files, 1 repeat: a check of the script")
    a = p.parse_args(argv)
    if a.tiny: a.n_files, a.repeats = 200, 1
    tmp = Path(tempfile.mkdtemp())
    folder = Path(a.folder) if a.folder else tmp / "pngs"
    t = time.perf_counter(); make_folder(folder, a.n_files); made = time.perf_counter() - t
    res = dict(startup=startup(folder, a.bs), checkpoint=checkpoint_cost(tmp, a.repeats), folder_made_s=round(made, 1))
    s, c = res["startup"], res["checkpoint"]
    H.print_table(["measure", "value"], [["files", s["n_files"]], ["list + sample sizes (s)", s["list_and_sample_s"]],
                                          ["DataLoaders (s)", s["dataloaders_s"]], ["demo epoch (s)", c["epoch_s"]],
                                          ["one checkpoint (s)", c["checkpoint_s"]], ["checkpoint size (MiB)", c["checkpoint_mib"]],
                                          ["checkpoint / epoch", c["checkpoint_share_of_epoch"]]])
    return res


if __name__ == "__main__": main()
