"""Decoding photographs, and whether training waits for them (issue 21 parts 1, 3, 5).

Part `decode`: images/s on one core of the folder loader's decoding (`data.decode_image`: JPEG draft mode, EXIF
orientation) against the decode before it (`Image.open(f).convert(mode).resize(...)`, full size), at 224, 96 and 24 px,
interleaved rounds, the order rotating; PIL decodes on one thread, so images per CPU second (`time.process_time`) is the
rate of one core, whatever else the machine runs.

Part `train`: one epoch of SwAV training (`Learner` + `SWAV`, resnet10t) on the folder's JPEGs through `folder_dls`
with the default workers (`data.default_workers`) and with 0, 1, 2 workers, against the same images decoded once and
held in memory (`image_tensor_dls`, the data floor); images/s of the training loop and its data wait (`DataWait`), 1
and 2 torch threads. The ratio folder / memory is what the data costs (goal >= 0.9).

Images: the photographs of Debian's `plasma-workspace-wallpapers` (`/usr/share/wallpapers`: 39 distinct JPEGs of
400x225 to 5120x2880 px, landscape and portrait, most 2560x1600), or `--folder`. `--tiny` writes a few synthetic JPEGs instead.
"""
from __future__ import annotations
import argparse
import io
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import harness as H
from self_supervised_swav.cache import cached_folder_dls
from self_supervised_swav.data import decode_image, default_workers, folder_dls, image_tensor_dls, usable_cores

WALLPAPERS = Path("/usr/share/wallpapers")


def args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="decode,train", help="decode, train (comma-separated)")
    p.add_argument("--folder", help="Folder of JPEG photographs; default: the wallpapers")
    p.add_argument("--max-pixels", type=int, help="Photographs larger than this are left out; default: none")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 96, 24], help="Decode sizes (part decode)")
    p.add_argument("--chunk", type=int, default=0, help="Images decoded per timed call (part decode); 0: every photograph once")
    p.add_argument("--train-sizes", type=int, nargs="+", default=[24, 96], help="Training image sizes (crops size and size/2)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (part train)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="Worker counts compared with the default (part train)")
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--n-images", type=int, default=400, help="Images of the training folder (the photographs repeated; part train)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="Timed calls per round (part decode)")
    p.add_argument("--json", help="Write the rows here")
    p.add_argument("--tiny", action="store_true", help="A few synthetic JPEGs, one round: checks that the script runs")
    return p


# ---- images
def photographs(folder: Path, max_pixels: int) -> list[Path]:
    "The JPEGs under `folder` (each file once: the wallpapers link one picture under several names), at most `max_pixels` pixels, sorted"
    files = sorted({f.resolve() for f in folder.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg")})
    keep = []
    for f in files:
        with Image.open(f) as im:
            if max_pixels is None or im.width * im.height <= max_pixels: keep.append(f)
    return keep


def synthetic_jpegs(folder: Path, n: int = 12) -> list[Path]:
    "`n` noisy gradient JPEGs of mixed sizes (for --tiny)"
    g = np.random.default_rng(0)
    for i in range(n):
        w, h = (320, 240) if i % 2 else (200, 300)
        arr = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * 0.7 + g.random((h, w, 3)) * 70
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return sorted(folder.glob("*.jpg"))


def full_decode(f: Path, size: int, mode: str = "RGB") -> Image.Image:
    "The decode before draft mode: full size, converted, squished"
    with Image.open(f) as im: return im.convert(mode).resize((size, size), Image.BILINEAR)


class Decodes:
    "A contender: each call decodes the next `chunk` files (cycling) with `fn(file, size)`"
    def __init__(self, name: str, fn, files: list[Path], size: int, chunk: int):
        self.name, self.fn, self.files, self.size, self.chunk, self.i = name, fn, files, size, chunk, 0
        self.cpu_s, self.n = 0., 0   # CPU time of this process and images decoded: images per CPU second do not depend on the load
    def call(self):
        t = time.process_time()
        for _ in range(self.chunk):
            self.fn(self.files[self.i % len(self.files)], self.size); self.i += 1
        self.cpu_s, self.n = self.cpu_s + time.process_time() - t, self.n + self.chunk
    def run(self, n: int) -> list[float]: return H.time_each(lambda _: self.call(), n, torch.device("cpu"))


def decode_part(a, files: list[Path]) -> list[dict]:
    rows, a.chunk = [], a.chunk or len(files)
    print(f"\nDecoding {len(files)} photographs ({_sizes(files)}), {a.chunk} per timed call, {a.steps} calls x {a.rounds} "
          "interleaved rounds; one process, one core (PIL decodes on one thread)")
    H.print_table(["size px", "contender", "images/s (wall)", "images per CPU second", "spread %", "speed-up (paired, wall)"], [])
    for size in a.sizes:
        cons = [Decodes("full", full_decode, files, size, a.chunk), Decodes("draft", decode_image, files, size, a.chunk)]
        t = H.run_interleaved(cons, a.rounds, a.steps, warmup=1, label=f"{size} px ", quiet=a.tiny)
        for c in cons:
            ips = a.chunk / (H.median_ms(H.flat(t[c.name])) / 1e3)
            ratio = H.paired_ratio(t["full"], t[c.name])
            per_cpu_s = c.n / max(c.cpu_s, 1e-9)
            print(f"| {size} | {c.name} | {ips:.0f} | {per_cpu_s:.0f} | {H.spread_pct(H.flat(t[c.name])):.0f} | {ratio:.2f} |", flush=True)
            rows.append(dict(part="decode", size=size, contender=c.name, images_s=round(ips, 1), images_per_cpu_s=round(per_cpu_s, 1),
                             speedup=round(ratio, 3)))
    return rows


def _sizes(files: list[Path]) -> str:
    px = [Image.open(f).size for f in files]
    return f"{min(min(s) for s in px)}-{max(max(s) for s in px)} px"


# ---- training
class Epoch:
    "A contender: one epoch of SwAV training on `dls`; `run` gives the seconds per training image, `waits` the data-wait shares"
    def __init__(self, name: str, dls, size: int, threads: int, n_protos: int):
        from fastai.learner import Learner
        from self_supervised_swav.layers import create_encoder
        from self_supervised_swav.progress import DataWait
        from self_supervised_swav.swav import SWAV, create_swav_model, get_swav_aug_pipelines
        self.name, self.threads, self.waits = name, threads, []
        augs = get_swav_aug_pipelines(num_crops=[2, 2], crop_sizes=[size, size // 2], min_scales=[0.6, 0.35], max_scales=[1., 0.6])
        self.dw = DataWait(hint_above=1.)
        torch.manual_seed(0)
        self.learn = Learner(dls, create_swav_model(create_encoder("resnet10t", pretrained=False, n_in=3), n_protos=n_protos),
                             cbs=[SWAV(augs, crop_assgn_ids=[0, 1], K=None, freeze_protos_iters=0), self.dw])
    def run(self, n: int) -> list[float]:
        with H.torch_threads(self.threads), redirect_stdout(io.StringIO()), self.learn.no_bar(), self.learn.no_logging():
            for _ in range(n): self.learn.fit(1, lr=1e-3)
        self.waits.append(self.dw.share)
        return [1 / self.dw.images_s]


def decoded(files: list[Path], size: int) -> torch.Tensor:
    "The images decoded once at `size` px, as the float tensor the folder loader's batches hold"
    return torch.stack([torch.from_numpy(np.array(decode_image(f, size))).permute(2, 0, 1) for f in files]).float() / 255


def train_part(a, files: list[Path]) -> list[dict]:
    rows, nw, cache_dir = [], default_workers(), tempfile.mkdtemp(prefix="bench_decode_cache_")
    files = (files * -(-a.n_images // len(files)))[:a.n_images]   # an epoch of many batches: the workers' start is a small part of it
    print(f"\nTraining throughput: one epoch of SwAV (resnet10t, crops 2x S + 2x S/2 px, batch {a.bs}, {len(files)} images, "
          f"valid 20 %) per contender per round, {a.rounds} interleaved rounds; {usable_cores()} cores, default workers {nw}")
    H.print_table(["size S", "torch threads", "contender", "images/s", "data wait %", "throughput / memory's (paired)"], [])
    for size in a.train_sizes:
        x = decoded(files, size)
        for threads in a.threads:
            cons = [Epoch("memory", image_tensor_dls(x, torch.zeros(len(x), dtype=torch.long), valid_pct=0.2, bs=a.bs, num_workers=0, device="cpu"), size, threads, a.bs)]
            for w in dict.fromkeys([None] + a.workers):   # the default first; a count equal to the default is measured once more
                name = f"folder, default ({nw} workers)" if w is None else f"folder, {w} workers"
                cons.append(Epoch(name, folder_dls(None, files, None, size, a.bs, 0.2, 0, num_workers=w), size, threads, a.bs))
            for w in dict.fromkeys([None] + a.workers):   # the cache is built by the first, once (not timed); the epochs read it
                with redirect_stdout(io.StringIO()):
                    cached = cached_folder_dls(files[0].parent, files, None, size, a.bs, cache=cache_dir, valid_pct=0.2, seed=0, num_workers=w)
                cons.append(Epoch(f"folder, --cache ({nw if w is None else w} workers{', default' if w is None else ''})", cached, size, threads, a.bs))
            t = H.run_interleaved(cons, a.rounds, 1, label=f"{size} px, {threads} threads ", quiet=a.tiny)
            for c in cons:
                ips = 1 / H.median_ms(H.flat(t[c.name])) * 1e3
                ratio = H.paired_ratio(t["memory"], t[c.name])
                wait = 100 * float(np.median(c.waits))
                print(f"| {size} | {threads} | {c.name} | {ips:.1f} | {wait:.0f} | {ratio:.2f} |", flush=True)
                rows.append(dict(part="train", size=size, threads=threads, contender=c.name, images_s=round(ips, 2),
                                 data_wait=round(wait / 100, 3), vs_memory=round(ratio, 3)))
    return rows


def main(argv: list[str] | None = None):
    a = args_parser().parse_args(argv)
    if a.tiny: a.rounds, a.steps, a.sizes, a.train_sizes, a.threads, a.workers, a.bs, a.chunk, a.n_images = 1, 1, [24], [16], [1], [], 4, 2, 12
    parts, rows = a.parts.split(","), []
    with tempfile.TemporaryDirectory() as tmp:
        if a.tiny: files = synthetic_jpegs(Path(tmp))
        else:
            folder = Path(a.folder) if a.folder else WALLPAPERS
            if not folder.is_dir(): raise SystemExit(f"no folder {folder}: apt-get install -y plasma-workspace-wallpapers, or pass --folder")
            files = photographs(folder, a.max_pixels)
        if "decode" in parts: rows += decode_part(a, files)
        if "train" in parts: rows += train_part(a, files)
    H.write_json(a.json, a, rows)
    return rows


if __name__ == "__main__":
    main()
