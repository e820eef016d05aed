"""Step time and peak memory of SwAV pretraining on CPU: 1 process against 2 gloo (DDP) processes.

Every configuration runs the same training step (multi-crop augmentation, forward, Sinkhorn codes
all-reduced over the processes, swapped-prediction loss, backward with DDP's gradient all-reduce, SGD step)
on random images, in worker processes started from this one, and reports per process:

* step time (median over the timed steps) and global throughput,
* peak resident memory (`ru_maxrss`, which includes each process's own copy of torch/fastai: a few hundred MiB)
  and its growth during the training steps. With `--start-method fork` the pages shared with the parent count in
  every worker's RSS as well, so compare the growth column there.

Configurations, measured in the same run (interleaved, `--repeats` times) so their ratios compare like with like:
`1 proc` (batch B), `1 proc, 1 thread`, `2 procs, weak` (B per process: global 2B), `2 procs, strong` (B/2 per
process: global B). By default a configuration uses all cores (threads per process = cores // processes). Workers start
with *spawn* (each imports the library: not timed); *fork* starts faster but can hang when the parent already
used OpenMP and workers use more than 1 thread.

    python bench/ddp_cpu.py                # small config (a minute or two on 2 cores)
    python bench/ddp_cpu.py --tiny         # a few seconds: what tests/test_distributed.py runs
    python bench/ddp_cpu.py --arch resnet10t --size 32 --bs 32

The processes are started by `harness.run_gloo` (the launcher the tests use too), with `--start-method`;
each times its own steps (`harness.time_each`), so start-up and imports are never timed. The queue (a `SwAVQueue`)
starts full of random unit embeddings (`contenders.fill_queue`), so that it enters Sinkhorn from the first step.
"""
from __future__ import annotations
import argparse
import contextlib
import os
import statistics
import tempfile

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import harness as H
from contenders import fill_queue
from self_supervised_swav.layers import create_encoder
from self_supervised_swav.swav import create_swav_model, get_swav_aug_pipelines, swav_codes, swav_loss


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="conv", help="'conv' (a 3-layer CNN) or a timm/fastai name, e.g. resnet10t")
    p.add_argument("--size", type=int, default=32, help="Large crop side in px (small crops are half)")
    p.add_argument("--bs", type=int, default=32, help="Batch size B of the 1-process run (see the module docstring)")
    p.add_argument("--n-protos", type=int, default=300, help="Number of prototypes")
    p.add_argument("--queue", type=int, default=256, help="Queue length K per process (0: no queue)")
    p.add_argument("--steps", type=int, default=20, help="Timed steps")
    p.add_argument("--warmup", type=int, default=3, help="Untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="Threads per process; 0: cores // processes")
    p.add_argument("--repeats", type=int, default=2, help="Runs of every configuration, interleaved; the fastest is reported")
    p.add_argument("--start-method", default="spawn", choices=["spawn", "fork", "forkserver"],
                   help="fork starts faster but can hang with more than 1 thread per process (OpenMP after fork)")
    p.add_argument("--timeout", type=float, default=600, help="Seconds before a configuration's workers are killed")
    p.add_argument("--tiny", action="store_true", help="A seconds-long configuration, to check the script runs")
    a = p.parse_args(argv)
    if a.tiny: a.size, a.bs, a.n_protos, a.queue, a.steps, a.warmup, a.repeats = 16, 8, 20, 8, 3, 1, 1
    return a


def _model(arch: str, n_protos: int) -> nn.Module:
    if arch == "conv":
        encoder = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                                nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    else: encoder = create_encoder(arch, pretrained=False, n_in=3)
    return create_swav_model(encoder, hidden_size=128, projection_size=64, n_protos=n_protos, bn=False)


@contextlib.contextmanager
def _start_method(method: str):
    "`harness.start_gloo` starting its processes with `method` while the block runs"
    old, H.START_METHOD = H.START_METHOD, method
    try: yield
    finally: H.START_METHOD = old


def _worker(rank: int, world: int, out_dir: str, a: argparse.Namespace, bs: int, threads: int):
    "One gloo process (started by `harness.run_gloo`): train `a.warmup + a.steps` steps, save its figures"
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _model(a.arch, a.n_protos)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    augs = get_swav_aug_pipelines(num_crops=[2, 4], crop_sizes=[a.size, a.size // 2], min_scales=[0.25, 0.05], max_scales=[1., 0.3])
    torch.manual_seed(1 + rank)
    images = torch.rand(4, bs, 3, a.size + a.size // 4, a.size + a.size // 4)   # a few batches, cycled
    if a.queue: fill_queue(model, a.queue, 2)
    losses = []
    def step(i: int):
        emb, scores = ddp(augs(images[i % len(images)]))
        qs = model.queue.scores(model.prototypes.weight) if model.queue.full else None
        codes = swav_codes(scores, bs, [0, 1], queue_scores=qs)
        if a.queue: model.queue.push(emb.view(-1, bs, emb.shape[-1])[:2])
        loss = swav_loss(scores, codes, [0, 1])
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    rss0 = H.rss_mib()
    torch.distributed.barrier()
    times = H.time_each(step, a.warmup + a.steps, torch.device("cpu"))[a.warmup:]
    H.save_result(out_dir, rank, step_ms=1e3 * statistics.median(times), loss=losses[-1], max_rss_mib=H.max_rss_mib(),
                        rss_growth_mib=H.rss_mib() - rss0)


def run_config(a: argparse.Namespace, nprocs: int, bs: int, label: str, threads: int = 0) -> dict:
    "Run one configuration in `nprocs` fresh processes; the slowest rank's step time, the largest RSS"
    threads = threads or a.threads or max(1, (os.cpu_count() or 1) // nprocs)
    with tempfile.TemporaryDirectory() as d, _start_method(a.start_method):
        ranks = H.run_gloo(_worker, d, a, bs, threads, world=nprocs, timeout=a.timeout)
    step = max(r["step_ms"] for r in ranks)
    return dict(label=label, nprocs=nprocs, threads=threads, bs=bs, global_bs=bs * nprocs, step_ms=step,
                img_per_s=1e3 * bs * nprocs / step, max_rss_mib=max(r["max_rss_mib"] for r in ranks),
                rss_growth_mib=max(r["rss_growth_mib"] for r in ranks), loss=ranks[0]["loss"])


def report(a: argparse.Namespace, results: list[dict]):
    print(f"SwAV DDP on CPU (gloo): arch={a.arch}, crops 2x{a.size}px + 4x{a.size // 2}px, n_protos={a.n_protos}, "
          f"queue={a.queue}/process, median of {a.steps} steps after {a.warmup}, fastest of {a.repeats} runs, "
          f"{os.cpu_count()} cores, start={a.start_method}")
    H.print_table(["config", "procs", "threads/proc", "bs/proc", "global bs", "step ms", "img/s", "max RSS/proc MiB", "RSS growth MiB"],
                  [[r["label"], r["nprocs"], r["threads"], r["bs"], r["global_bs"], f"{r['step_ms']:.1f}", f"{r['img_per_s']:.0f}",
                    f"{r['max_rss_mib']:.0f}", f"{r['rss_growth_mib']:.1f}"] for r in results])
    for one in [r for r in results if r["nprocs"] == 1]:
        for r in [r for r in results if r["nprocs"] > 1]:
            print(f"ratio {r['label']} / {one['label']}: step time x{r['step_ms'] / one['step_ms']:.2f}, "
                  f"throughput x{r['img_per_s'] / one['img_per_s']:.2f}, max RSS/proc x{r['max_rss_mib'] / one['max_rss_mib']:.2f}, "
                  f"RSS growth/proc x{r['rss_growth_mib'] / max(one['rss_growth_mib'], 1e-9):.2f}")


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    configs = [(1, a.bs, "1 proc", 0), (1, a.bs, "1 proc, 1 thread", 1),
               (2, a.bs, "2 procs, weak", 0), (2, max(1, a.bs // 2), "2 procs, strong", 0)]
    runs = [[run_config(a, *c) for c in configs] for _ in range(a.repeats)]   # interleaved: load changes hit all alike
    results = [min(rs, key=lambda r: r["step_ms"]) for rs in zip(*runs)]
    report(a, results)
    return results


if __name__ == "__main__": main()
