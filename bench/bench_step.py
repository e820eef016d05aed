"""Full SwAV training step: this project (fastai `Learner` + `SWAV` callback) against the original library, lightly and a floor.

A step is everything one batch costs: fetching it, making all crops (augmentation), the forward pass of every crop,
Sinkhorn codes, the swapped-prediction loss, backward and the optimiser step. Four contenders (`contenders.py`:
`project`, `original`, `lightly`, `floor`) train the same encoder (timm `resnet18`, no pretrained weights) on the same images with
the same optimiser (SGD, momentum 0.9) and crops.

Each contender runs `--warmup + --steps` steps per round; rounds are interleaved, the order of the contenders rotating
each round, so that load from other processes hits all alike (`harness.run_interleaved`). Step times are medians over
all rounds' timed steps; ratios (`project/lightly` throughput, `project/floor` step time) are medians over rounds of
the ratio within a round, so that load drifting between rounds cancels, and are only meaningful within one run. Step
time is the time between the ends of consecutive steps, so it includes waiting for the next batch.

    python bench/bench_step.py                        # CPU config: 2x64 + 6x32 px crops, batch 32, queue on and off
    python bench/bench_step.py --config gpu --device cuda   # 2x224 + 6x96 px, batch 256
    python bench/bench_step.py --memory               # peak memory: each contender alone in a fresh process
    python bench/bench_step.py --profile              # phase times, torch.profiler tables (and syncs on cuda)
    python bench/bench_step.py --tiny                 # seconds (plus imports): what tests/test_bench.py runs
"""
from __future__ import annotations
import argparse
import json

import torch

import harness as H
from contenders import BF16, CLASSES, DEFAULT, Project, add_common_args, available, describe, finish_args, in_precision, make_images, n_images


def parse_args(argv=None) -> argparse.Namespace:
    "The parsed arguments (`settings`: as parsed, for a child process) with the config's defaults filled in"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--workers", type=int, help="lightly's DataLoader workers; default from --config")
    p.add_argument("--contenders", default=",".join(DEFAULT), help="Comma-separated subset of " + ",".join(CLASSES))
    p.add_argument("--queue-modes", default="off,on", help="Comma-separated: off (no queue) and/or on (a full queue)")
    p.add_argument("--memory", action="store_true", help="Peak memory: run each contender alone in a fresh process")
    p.add_argument("--profile", action="store_true", help="Print a torch.profiler table of the project's steps")
    p.add_argument("--child", help=argparse.SUPPRESS)   # internal (--memory): the settings of one contender's process
    raw = p.parse_args(argv)
    settings = H.child_settings(raw.child) if raw.child else argparse.Namespace(**vars(raw), only=None)
    a = finish_args(settings)
    a.settings = settings
    return a


# ---- speed
def bench_speed(a: argparse.Namespace) -> list[dict]:
    names, precisions = available([c for c in a.contenders.split(",") if c]), [p for p in a.precisions.split(",") if p]
    images = make_images(n_images(a), a.img_size, a.seed)
    rows = []
    for mode in [m for m in a.queue_modes.split(",") if m]:
        queue = a.queue if mode == "on" else 0
        contenders = [in_precision(CLASSES[n], a, images, queue, n, p) for n in names for p in precisions]
        times = H.run_interleaved(contenders, a.rounds, a.steps, a.warmup, label=f"queue {mode}: ")
        for name, rounds in times.items():
            ts, suffix = H.flat(rounds), BF16 if name.endswith(BF16) else ""
            ms = H.median_ms(ts)
            ratios = {f"time_vs_{ref}": H.paired_ratio(rounds, times[ref + suffix]) for ref in ("original", "lightly", "floor") if ref + suffix in times}
            if suffix and name.removesuffix(BF16) in times: ratios["time_vs_fp32"] = H.paired_ratio(rounds, times[name.removesuffix(BF16)])
            rows.append(dict(queue=queue, contender=name, step_ms=ms, img_per_s=1e3 * a.bs / ms, spread_pct=H.spread_pct(ts), **ratios))
    return rows


def report_speed(a: argparse.Namespace, rows: list[dict]):
    print(f"Full SwAV step: {describe(a)}")
    print("Ratios are medians over rounds of the ratio within each round (paired: load changes between rounds cancel).")
    def vs(r, ref, f): return f"{f(r[ref]):.2f}" if ref in r else "-"
    print("A bf16 contender's ratios are against the others in bf16; its speed-up is against itself in float32.")
    H.print_table(["queue", "contender", "step ms", "images/s", "spread %", "throughput / original's", "throughput / lightly's",
                   "throughput / floor's", "bf16 speed-up"],
                  [[r["queue"] or "off", r["contender"], f"{r['step_ms']:.0f}", f"{r['img_per_s']:.1f}", f"{r['spread_pct']:.0f}",
                    *(vs(r, f"time_vs_{ref}", lambda x: 1 / x) for ref in ("original", "lightly", "floor", "fp32"))] for r in rows])


# ---- memory
def bench_one_memory(a: argparse.Namespace) -> dict:
    "In a child process: train one contender here and return its peak memory"
    base = H.rss_mib()
    queue = a.queue if a.queue_modes == "on" else 0
    c = CLASSES[a.only](a, make_images(n_images(a), a.img_size, a.seed), queue)
    if a.device.type == "cuda": torch.cuda.reset_peak_memory_stats(a.device)
    setup = H.rss_mib()
    times = c.run(a.warmup + a.steps)[a.warmup:]
    own = H.max_rss_mib()
    res = dict(contender=a.only, queue=queue, base_mib=base, setup_mib=setup, max_rss_mib=own, growth_mib=own - setup,
               worker_max_rss_mib=H.max_rss_mib(children=True) if a.only == "lightly" and a.workers else 0.,
               step_ms=H.median_ms(times))
    if a.device.type == "cuda": res["cuda_peak_mib"] = torch.cuda.max_memory_allocated(a.device) / 2**20
    return res


def memory_child(a: argparse.Namespace, name: str) -> dict:
    "The settings of the fresh process measuring contender `name`: the parsed ones, with the queue on, one round, no file"
    return dict(vars(a.settings), memory=False, json=None, queue_modes="on", rounds=1, only=name)


def bench_memory(a: argparse.Namespace) -> list[dict]:
    "Each contender alone in a fresh process (queue on), so that peaks do not mix"
    return [H.in_fresh_process(__file__, memory_child(a, n)) for n in available([c for c in a.contenders.split(",") if c])]


def report_memory(a: argparse.Namespace, rows: list[dict]):
    print(f"Peak memory of the step (queue on, each contender alone in a fresh process, {a.warmup} + {a.steps} steps): "
          + describe(a).split("; median")[0])
    cuda = a.device.type == "cuda"
    H.print_table(["contender", "RSS with torch imported MiB", "after setup MiB", "max RSS MiB", "growth in steps MiB",
                   "max worker RSS MiB"] + (["CUDA peak MiB"] if cuda else []),
                  [[r["contender"]] + [f"{r[k]:.0f}" for k in ("base_mib", "setup_mib", "max_rss_mib", "growth_mib", "worker_max_rss_mib")]
                   + ([f"{r['cuda_peak_mib']:.0f}"] if cuda else []) for r in rows])
    ref = {r["contender"]: r for r in rows}
    if "project" in ref and "lightly" in ref:
        print(f"project/lightly max RSS: {ref['project']['max_rss_mib'] / ref['lightly']['max_rss_mib']:.2f} "
              f"(main process; lightly's workers hold their own copies on top)")


# ---- profile
def profile_project(a: argparse.Namespace):
    "The project's step (queue on): phase times without profiler, syncs on cuda, then torch.profiler operator tables"
    c, phases = Project(a, make_images(n_images(a), a.img_size, a.seed), a.queue), Project.phases()
    print(f"Project step, queue {a.queue}: {describe(a)}")
    shares, step_ms = H.phase_shares(c, phases, a.device, a.rounds, a.steps, a.warmup, rest="rest: data, fastai, callbacks")
    print(f"Phases (timed without profiler; % of the round's time, median over rounds; step {step_ms:.0f} ms):")
    H.print_table(["phase", "% of step", "ms per step"], [[k, f"{v:.1f}", f"{v * step_ms / 100:.0f}"] for k, v in shares.items()])
    if a.device.type == "cuda":
        syncs = H.count_syncs(c, phases, a.warmup + a.steps, rest="outside these phases (data, fastai)")
        H.print_table(["phase", "syncs per step"], [[k, f"{v:.1f}"] for k, v in syncs.items()])
        print(f"\nHost-device syncs per step: {sum(syncs.values()):.0f}")
    H.print_profile(c, phases, a.device, a.steps)


def main(argv=None):
    a = parse_args(argv)
    if a.only: print(json.dumps(bench_one_memory(a))); return
    if a.profile: profile_project(a); return
    if a.memory: rows = bench_memory(a); report_memory(a, rows)
    else: rows = bench_speed(a); report_speed(a, rows)
    H.write_json(a.json, a, rows)
    return rows


if __name__ == "__main__": main()
