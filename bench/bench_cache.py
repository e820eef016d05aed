"""Epoch time of SwAV pretraining on a folder of photographs: decoding every image in every epoch (`folder_dls`) against
reading the decoded cache (`cached_folder_dls`, `swav_pretrain --cache`), interleaved, as a paired ratio; and the
one-off time of building the cache.

    python bench/bench_cache.py --path /usr/share/wallpapers --size 96 --rounds 3 --json bench/cache_96.json

Both loaders use the default DataLoader workers (fastai's: one per core) unless `--workers`. `--tiny`: a few small
generated PNGs, one round (the test's configuration).
"""
from __future__ import annotations
import argparse
import tempfile
import time
from pathlib import Path

import harness as H
import numpy as np
from PIL import Image
from fastai.learner import Learner
from fastai.torch_core import set_seed
import fastai.callback.progress  # noqa: F401  (Learner.no_bar)

from self_supervised_swav.cache import cached_folder_dls, image_cache
from self_supervised_swav.data import folder_dls, folder_images
from self_supervised_swav.layers import create_encoder
from self_supervised_swav.swav import SWAV, create_swav_model, get_swav_aug_pipelines


class Epochs:
    "A contender: `run(n)` gives the seconds of `n` epochs of a SwAV fit over `dls` (loading included)"
    def __init__(self, name: str, dls, a: argparse.Namespace):
        set_seed(0)
        augs = get_swav_aug_pipelines(num_crops=[2, 2], crop_sizes=[a.size, a.size // 2], min_scales=[0.3, 0.1], max_scales=[1., 0.3])
        model = create_swav_model(create_encoder(a.arch, pretrained=False, n_in=3), n_protos=16)
        self.name, self.learn = name, Learner(dls, model, cbs=SWAV(augs, [0, 1], K=None, freeze_protos_iters=0))
    def run(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            with self.learn.no_bar(), self.learn.no_logging(): self.learn.fit(1, 1e-3)
            times.append(time.perf_counter() - t)
        return times


def tiny_folder(root: Path) -> Path:
    "12 random RGB PNGs of mixed sizes"
    rng = np.random.default_rng(0)
    for i in range(12): Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 60, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", default="/usr/share/wallpapers", help="Folder of images (searched recursively)")
    p.add_argument("--size", type=int, default=96, help="Images resized to size px; crops of size and size/2 px")
    p.add_argument("--arch", default="resnet10t")
    p.add_argument("--bs", type=int, default=16)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers; default: fastai's")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2, help="Epochs per contender and round (after one warm-up epoch)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None)
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    if a.tiny: a.path, a.size, a.bs, a.workers, a.rounds, a.epochs = str(tiny_folder(Path(tmp.name))), 16, 4, 0, 1, 1
    H.set_threads(a.threads)
    files = folder_images(a.path)
    t = time.perf_counter()
    image_cache(a.path, files, a.size, 3, Path(tmp.name) / "cache", a.workers, progress=False)
    build = time.perf_counter() - t
    kw = dict(files=files, labels=None, size=a.size, bs=a.bs, num_workers=a.workers)
    contenders = [Epochs("decode", folder_dls(a.path, **kw), a),
                  Epochs("cache", cached_folder_dls(a.path, **kw, cache=Path(tmp.name) / "cache", progress=False), a)]
    times = H.run_interleaved(contenders, a.rounds, a.epochs, warmup=1)
    ratio = H.paired_ratio(times["cache"], times["decode"])
    rows = [dict(measure="images (training)", value=len(contenders[0].learn.dls.train.dataset)),
            dict(measure="epoch, decoding every image (median s)", value=round(H.median_ms(H.flat(times["decode"])) / 1e3, 2)),
            dict(measure="epoch, reading the cache (median s)", value=round(H.median_ms(H.flat(times["cache"])) / 1e3, 2)),
            dict(measure="epoch time, cache / decode (paired)", value=round(ratio, 3)),
            dict(measure="building the cache, once (s)", value=round(build, 2))]
    H.print_table(["measure", "value"], [[r["measure"], r["value"]] for r in rows])
    H.write_json(a.json, a, rows)
    tmp.cleanup()


if __name__ == "__main__": main()
