"""The timing harness of the benchmark scripts: timers, interleaved rounds, paired ratios, memory, processes, phases, tables.

A contender is any object with a `name` and a `run(n) -> list[float]` giving the seconds of `n` steps. The scripts
build contenders and hand them to `run_interleaved`; everything else here is the measuring and the reporting.

The scripts run as `python bench/NAME.py` (Python puts `bench/` on `sys.path`, so `import harness` works) and take the
official reference code from the library (`self_supervised_swav.reference`), never from `tests/`. The gloo launcher
(`run_gloo`, `save_result`) lives here, shared with the multi-process tests (pytest's `pythonpath` holds `bench/`).
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
from pathlib import Path
from typing import Callable

import torch
from self_supervised_swav.distributed import run_on_cpus

START_METHOD = os.environ.get("SWAV_TEST_START_METHOD", "fork")   # of `start_gloo`'s processes

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


# ---- threads, clocks
def set_threads(n: int):
    "torch intra-op threads: `n`, or torch's default (all cores) for 0"
    if n: torch.set_num_threads(n)


@contextlib.contextmanager
def torch_threads(n: int):
    "A block run with `n` torch threads (0: unchanged); the previous count restored after"
    old = torch.get_num_threads()
    set_threads(n)
    try: yield
    finally: torch.set_num_threads(old)


def sync(device: torch.device):
    "Wait for the device, so that a timestamp covers the work queued before it"
    if device.type == "cuda": torch.cuda.synchronize(device)


class Laps:
    "Times between consecutive `lap()`s (a step's time then includes waiting for its batch), synchronised with the device"
    def __init__(self, device: torch.device): self.device = device; self.start()
    def start(self):
        sync(self.device); self.times, self.t = [], time.perf_counter()
    def lap(self):
        sync(self.device); t = time.perf_counter()
        self.times.append(t - self.t); self.t = t


def time_each(fn: Callable[[int], object], n: int, device: torch.device) -> list[float]:
    "Seconds of each of the calls `fn(0)`, ..., `fn(n - 1)`, timed alone (what happens between calls is not counted)"
    times = []
    for i in range(n):
        sync(device); t = time.perf_counter()
        fn(i)
        sync(device); times.append(time.perf_counter() - t)
    return times


class Calls:
    "A contender made of one function: `run(n)` times `n` calls of `fn()`"
    def __init__(self, name: str, fn: Callable[[], object], device: torch.device):
        self.name, self.fn, self.device = name, fn, device
    def run(self, n: int) -> list[float]: return time_each(lambda _: self.fn(), n, self.device)


# ---- rounds and ratios
def run_interleaved(contenders: list, rounds: int, n: int, warmup: int = 0, label: str = "",
                    quiet: bool = False) -> dict[str, list[list[float]]]:
    "Each contender's `run(warmup + n)`, `rounds` times, the order rotating each round; per round its last `n` times"
    times = {c.name: [] for c in contenders}
    for r in range(rounds):
        for c in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:
            times[c.name].append(c.run(warmup + n)[warmup:])
        if not quiet:
            print(f"  {label}round {r + 1}/{rounds}: " + ", ".join(f"{k} {median_ms(v[-1]):.0f} ms" for k, v in times.items()),
                  file=sys.stderr, flush=True)
    return times


def flat(rounds: list[list[float]]) -> list[float]: return [t for ts in rounds for t in ts]
def median_ms(times: list[float]) -> float: return 1e3 * statistics.median(times)
def spread_pct(times: list[float]) -> float: return 100 * (max(times) - min(times)) / statistics.median(times)


def paired_ratio(num: list[list[float]], den: list[list[float]]) -> float:
    "Median over rounds of (median time of `num` / that of `den`) within the round: slow drifts of load cancel"
    return statistics.median(statistics.median(n) / statistics.median(d) for n, d in zip(num, den))


# ---- memory
def rss_mib() -> float:
    "Current resident set size of this process in MiB"
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def max_rss_mib(children: bool = False) -> float:
    "Peak resident set size in MiB of this process, or of its largest finished child process"
    return resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss / 1024


def in_fresh_process(script: str, settings: dict) -> dict:
    "Run `script --child SETTINGS_JSON` in a new interpreter; the JSON object its last output line prints"
    out = subprocess.run([sys.executable, script, "--child", json.dumps(settings)], capture_output=True, text=True)
    if out.returncode: raise RuntimeError(f"{script} --child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_settings(child: str) -> argparse.Namespace:
    "The settings `in_fresh_process` passed (the parsed arguments of the parent, changed where it chose)"
    return argparse.Namespace(**json.loads(child))


# ---- gloo process groups (the launcher of `ddp_cpu.py` and of the multi-process tests): the library's `run_on_cpus`
def start_gloo(fn, out_dir: Path, *args, world: int = 2, timeout: float = 90) -> None:
    "Run `fn(rank, world, out_dir, *args)` in `world` gloo processes and wait for them (killed after `timeout` s)"
    run_on_cpus(fn, out_dir, *args, world=world, timeout=timeout, start_method=START_METHOD)


def run_gloo(fn, out_dir: Path, *args, world: int = 2, timeout: float = 90) -> list:
    "`start_gloo`, then what each rank saved with `save_result`, rank by rank"
    start_gloo(fn, out_dir, *args, world=world, timeout=timeout)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def save_result(out_dir: Path, rank: int, **results):
    "Save this rank's results for `run_gloo`"
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


# ---- output
def print_table(header: list[str], rows: list[list]):
    "A markdown table"
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows: print("| " + " | ".join(str(c) for c in r) + " |")


def write_json(path: str | None, a: argparse.Namespace, rows: list[dict]):
    "The settings and the result rows in the JSON file `path` (nothing when None)"
    if path:
        with open(path, "w") as f: json.dump(dict(args={k: str(v) for k, v in vars(a).items()}, rows=rows), f, indent=1)


# ---- phases of a step: public methods wrapped while a block runs
@contextlib.contextmanager
def wrapped(targets: list[tuple[object, str, str]], wrap: Callable):
    "Replace each `owner.attr` of `targets` `(owner, attr, label)` by `wrap(label, original)` while the block runs"
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
    for (owner, attr, f), (*_, label) in zip(saved, targets): setattr(owner, attr, wrap(label, f))
    try: yield
    finally:
        for owner, attr, f in saved: setattr(owner, attr, f)


def _timing(acc: dict, device: torch.device):
    "A `wrap` for `wrapped` adding each call's seconds to `acc[label]`; a call inside another phase's call is not counted twice"
    active = []
    def wrap(label, f):
        def g(*args, **kwargs):
            if active: return f(*args, **kwargs)
            sync(device); t = time.perf_counter(); active.append(label)
            try: return f(*args, **kwargs)
            finally: active.pop(); sync(device); acc[label] = acc.get(label, 0.) + time.perf_counter() - t
        return g
    return wrap


def phase_shares(contender, targets: list, device: torch.device, rounds: int, n: int, warmup: int,
                 rest: str = "rest") -> tuple[dict[str, float], float]:
    "Share (%) of each phase in the contender's steps, timed with perf_counter (no profiler): median over rounds; step ms"
    acc, shares, whole = {}, {label: [] for *_, label in targets}, []
    with wrapped(targets, _timing(acc, device)):
        for _ in range(rounds):
            ts = contender.run(warmup + n)
            whole += ts[warmup:]
            for label in shares: shares[label].append(100 * acc.pop(label, 0.) / sum(ts))
    res = {label: statistics.median(v) for label, v in shares.items()}
    res[rest] = 100 - sum(res.values())
    return res, median_ms(whole)


def count_syncs(contender, targets: list, n: int, rest: str = "outside these phases") -> dict[str, float]:
    "Synchronising CUDA calls per step in each phase (`torch.cuda.set_sync_debug_mode`)"
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
        with wrapped(targets, wrap), warnings.catch_warnings(record=True) as others:
            warnings.simplefilter("always")
            contender.run(n)
        counts[rest] = sum("synchroniz" in str(x.message) for x in others)
    finally: torch.cuda.set_sync_debug_mode("default")
    return {label: k / n for label, k in counts.items()}


def print_profile(contender, targets: list, device: torch.device, n: int, rows: int = 25):
    "torch.profiler operator tables of `n` steps, each phase of `targets` marked as a `record_function` range"
    from torch.profiler import ProfilerActivity, profile, record_function
    def labelled(label, f):
        def g(*args, **kwargs):
            with record_function("phase: " + label): return f(*args, **kwargs)
        return g
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with wrapped(targets, labelled), profile(activities=acts, record_shapes=True) as prof: contender.run(n)
    print(f"\ntorch.profiler over {n} steps (its overhead inflates op-heavy Python code such as kornia's):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=55))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows,
                                                             max_name_column_width=40, max_shapes_column_width=60))
