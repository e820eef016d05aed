"""Every GPU figure of issue 14 in one command, within 8 minutes on one CUDA GPU: one JSON and one markdown report.

Parts, in this order, each with its own time cap (`CAPS`, seconds; a part that runs over is killed and reported, the
next one starts), all under one overall `--budget`:

* `env`: Python, torch, CUDA, the GPU, versions of fastai/fastcore/kornia/timm/lightly/self_supervised.
* `tests`: `pytest -m gpu tests/test_gpu.py` (fp16 with the grad scaler, bf16, CUDA random state in checkpoints,
  SyncBatchNorm and NCCL, Sinkhorn under CUDA autocast).
* `sinkhorn`: `bench_sinkhorn.py` on the GPU, and each case against the memory-bandwidth bound: the time to read the
  scores once and write the codes once at the device-to-device copy bandwidth measured just before.
* `step`: `bench_step.py --config gpu` (2x224 + 6x96 px crops, batch 256, queue 3840): the project against lightly,
  the original fastai `self_supervised` library (when installed; `make gpu-check` installs its wheel) and the floor.
* `syncs`: the project's step by phase (`harness.phase_shares`) and host-device syncs per phase (`harness.count_syncs`).
* `memory`: peak CUDA memory (`torch.cuda.max_memory_allocated`) of each contender's steps (`bench_step.bench_one_memory`).
* `augs`: `bench_augs.py --config gpu --modes all`: the project's kornia batch pipelines on the GPU (and before issue 14's
  changes, and the original library's) against per-image
  torchvision (official recipe, lightly) in one DataLoader worker per core.
* `fashion_mnist`: a short Fashion-MNIST pretraining (`bench/fashion_mnist.py` with the configuration chosen on CPU, `fashion_mnist.CHOSEN`; `--fm-minutes` of
  pretraining), then kNN and linear-probe top-1 on the 10k test images. Skipped with a message without the data.

On the GPU every part runs in its own process (`--part NAME`) killed at its cap. `--dry-run` runs every part in this
process on the CPU at tiny sizes, in seconds, so that the script cannot rot (`tests/test_gpu_check.py`).

    make gpu-check                                          # on the GPU machine: wheels, then this, results under $OUT
    python bench/gpu_check.py --out /tmp/gc                 # the same, without installing anything
    python bench/gpu_check.py --dry-run --out /tmp/gc       # CPU, tiny sizes
    python bench/gpu_check.py --parts step,syncs            # some parts only

Writes `gpu_check.json` (every part's status, seconds, command, rows), `gpu_check.md` (one section per part, ready
for BENCHMARKS.md) and, on the GPU, `gpu_check.log` (the parts' own output) in `--out` (default: `$OUT`, else
`gpu_check_out/`); exits with 1 when a part failed or ran over its cap.

With this workplace's device tool, Fashion-MNIST travels as an ignored folder (31 MB; the tree stays under 64 MiB):
first `mkdir -p tmp/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz tmp/fashion-mnist/` here, then
`run(command="make gpu-check", carry=["tmp/fashion-mnist"], timeout_s=560)`.
"""
from __future__ import annotations
import argparse
import ast
import contextlib
import functools
import gc
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

PARTS = ["env", "tests", "sinkhorn", "step", "syncs", "memory", "augs", "fashion_mnist"]
CAPS = dict(env=30, tests=75, sinkhorn=45, step=100, syncs=50, memory=45, augs=75, fashion_mnist=150)   # seconds on a GPU
BUDGET = 470                               # seconds for all parts: `make gpu-check` installs first, 8 minutes in all
FM_ROOTS = [Path("/usr/share/datasets/fashion-mnist"), ROOT / "tmp" / "fashion-mnist"]   # Debian's, or carried
FM_MISSING = ("Fashion-MNIST not found in {roots}: skipped (apt-get install -y dataset-fashion-mnist, or copy its four "
              ".gz files to tmp/fashion-mnist/ and carry that folder)")
PACKAGES = ["torch", "torchvision", "fastai", "fastcore", "fasttransform", "kornia", "timm", "lightly", "self_supervised",
            "self_supervised_swav", "numpy", "scikit-learn"]


# ---- settings
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, every part in this process: seconds")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="Folder of gpu_check.json/.md/.log")
    p.add_argument("--parts", default=",".join(PARTS), help="Comma-separated subset of " + ",".join(PARTS))
    p.add_argument("--budget", type=float, default=BUDGET, help="Seconds for all parts; a part gets min(its cap, what is left)")
    p.add_argument("--cap-scale", type=float, default=1.0, help="Multiply every part's cap (a slower GPU)")
    p.add_argument("--fm-root", help="Folder of the four Fashion-MNIST .gz files; default: the first of " + ", ".join(map(str, FM_ROOTS)))
    p.add_argument("--fm-minutes", type=float, default=1.0, help="Fashion-MNIST pretraining budget in minutes")
    p.add_argument("--in-process", action="store_true", help="Run the parts in this process (no caps enforced by kill)")
    p.add_argument("--part", help=argparse.SUPPRESS)          # internal: run this one part, write its result to --result
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    unknown = set(a.parts.split(",")) - set(PARTS)
    if unknown: p.error(f"--parts: unknown {sorted(unknown)}; choose from {','.join(PARTS)}")
    return a


def device_of(a) -> str: return "cpu" if a.dry_run else "cuda"


@contextlib.contextmanager
def tee_stdout():
    "Capture what the block prints (the bench scripts' markdown reports) while still printing it"
    buf, real = io.StringIO(), sys.stdout
    class Tee(io.TextIOBase):
        def write(self, s): real.write(s); buf.write(s); return len(s)
        def flush(self): real.flush()
    sys.stdout = Tee()
    try: yield buf
    finally: sys.stdout = real


def bench_main(module: str, argv: list[str]):
    "`bench/module.py`'s `main(argv)` with torch's thread count restored after; (rows, printed report, command line)"
    import importlib
    import torch
    threads = torch.get_num_threads()
    try:
        with tee_stdout() as out: rows = importlib.import_module(module).main(argv)
    finally: torch.set_num_threads(threads)
    return rows, out.getvalue(), f"python bench/{module}.py " + " ".join(argv)


def result(rows=None, markdown: str = "", command: str = "", status: str = "ok", message: str = "", **extra) -> dict:
    return dict(status=status, message=message, command=command, rows=rows, markdown=markdown, **extra)


def skipped(message: str) -> dict:
    print(message)
    return result(status="skipped", message=message)


# ---- parts
def part_env(a) -> dict:
    import torch
    versions = {}
    for name in PACKAGES:
        try: versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError: versions[name] = None
    env = dict(python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
               cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(), versions=versions)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_mib=p.total_memory // 2**20, sms=p.multi_processor_count,
                   bf16=torch.cuda.is_bf16_supported(), nccl=torch.distributed.is_nccl_available())
    if not a.dry_run and not torch.cuda.is_available(): print("no CUDA GPU is visible: the GPU parts will fail (use --dry-run on a CPU)")
    md = "\n".join([f"Machine: {env.get('gpu', 'no GPU')}, {env['cpus']} CPU cores, Python {env['python']}, torch {env['torch']} "
                    f"(CUDA {env['cuda']})", "", "| package | version |", "|---|---|",
                    *[f"| {k} | {v or 'not installed'} |" for k, v in versions.items()]])
    print(md)
    return result(env, md)


def gpu_test_names() -> list[str]:
    "The test functions of tests/test_gpu.py, read from its source"
    tree = ast.parse((ROOT / "tests" / "test_gpu.py").read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


def part_tests(a) -> dict:
    names = gpu_test_names()
    if a.dry_run: return skipped(f"dry run: pytest -m gpu not run; tests/test_gpu.py holds {len(names)} tests: {', '.join(names)}")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider", "-rfEs"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(out.stdout[-6000:], out.stderr[-3000:])
    summary = (out.stdout.strip().splitlines() or ["(no output)"])[-1]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", summary)}
    failures = [ln for ln in out.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    md = "\n".join([f"`pytest -m gpu tests/test_gpu.py`: {summary.strip('= ')}", *[f"- {ln}" for ln in failures]])
    ok = out.returncode == 0 and counts.get("passed", 0) > 0   # all skipped: no GPU was seen
    return result(dict(counts=counts, failures=failures, returncode=out.returncode), md, " ".join(cmd[2:]),
                  status="ok" if ok else "failed", message=summary)


def copy_bandwidth(device: str, mib: int, repeats: int = 10) -> float:
    "Device-to-device copy bandwidth in GB/s (bytes read plus bytes written), median of `repeats` copies"
    import statistics
    import torch
    import harness as H
    x = torch.empty(mib * 2**18, device=device).uniform_(); y = torch.empty_like(x)
    y.copy_(x); H.sync(torch.device(device))
    ts = H.time_each(lambda _: y.copy_(x), repeats, torch.device(device))
    return 2 * x.numel() * 4 / statistics.median(ts) / 1e9


def sinkhorn_bytes(row: dict) -> tuple[int, int]:
    "(bytes of the scores read, bytes of the float32 codes written) of one `bench_sinkhorn` row"
    import torch
    m = re.fullmatch(r"B=(\d+)(?:\+(\d+)q x(\d+))?", row["case"])
    bs, queue, crops = int(m[1]), int(m[2] or 0), int(m[3] or 1)
    itemsize = torch.empty((), dtype=getattr(torch, row["dtype"])).element_size()
    return crops * (bs + queue) * row["K"] * itemsize, crops * bs * row["K"] * 4


def part_sinkhorn(a) -> dict:
    dev = device_of(a)
    gbps = copy_bandwidth(dev, 4 if a.dry_run else 1024)
    argv = ["--tiny"] if a.dry_run else ["--device", "cuda", "--sizes", "256,1024,4096", "--protos", "3000,30000",
                                          "--repeats", "10", "--threads", "0"]
    rows, report, cmd = bench_main("bench_sinkhorn", argv)
    lines = ["", f"Memory-bandwidth bound: read the scores once and write the float32 codes once at the measured "
             f"device-to-device copy bandwidth, {gbps:.0f} GB/s (read + write); `x bound` = project ms / bound ms (1 is the floor).",
             "", "| K | dtype | scores | MB moved | bound ms | project ms | x bound | official ms | x bound |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        moved = sum(sinkhorn_bytes(r))
        r.update(bound_ms=1e3 * moved / (gbps * 1e9), mb_moved=moved / 1e6)
        r.update(project_x_bound=r["project_ms"] / r["bound_ms"], official_x_bound=r["official_ms"] / r["bound_ms"])
        lines.append(f"| {r['K']} | {r['dtype']} | {r['case']} | {r['mb_moved']:.1f} | {r['bound_ms']:.3f} | {r['project_ms']:.2f} | "
                     f"{r['project_x_bound']:.1f} | {r['official_ms']:.2f} | {r['official_x_bound']:.1f} |")
    print("\n".join(lines))
    return result(rows, report + "\n".join(lines), cmd, copy_gbps=gbps)


def step_argv(a) -> list[str]:
    "bench_step.py's arguments of the GPU configuration (or its --tiny one)"
    if a.dry_run: return ["--tiny", "--device", "cpu", "--threads", "1", "--queue-modes", "on"]
    return ["--config", "gpu", "--device", "cuda", "--threads", "0", "--queue-modes", "on", "--rounds", "3",
            "--steps", "4", "--warmup", "2"]


@functools.cache   # a failed import can leave parts of lightly behind: ask once per process
def lightly_problem() -> str | None:
    "Why lightly cannot be compared (not installed, or an import of what the contenders use fails), or None"
    if importlib.util.find_spec("lightly") is None: return "lightly is not installed: lightly rows skipped (bench/wheels/ has it)"
    try:
        import lightly.loss, lightly.models.modules, lightly.transforms.swav_transform  # noqa: F401,E401
    except Exception as e:   # e.g. a dependency of lightly missing on the machine: report it, run the others
        return f"lightly does not import ({type(e).__name__}: {e}): lightly rows skipped"
    return None


def step_contenders() -> tuple[list[str], list[str]]:
    "(contenders to run, messages about those left out): lightly where it imports, the original library where contenders.py has it"
    from contenders import ORIGINAL_MISSING, original_available
    names, notes = ["project", "floor"], []
    problem = lightly_problem()
    if problem: notes.append(problem)
    else: names.insert(1, "lightly")
    if original_available(): names.insert(-1, "original")
    else: notes.append(ORIGINAL_MISSING)
    for n in notes: print(n)
    return names, notes


def part_step(a) -> dict:
    names, notes = step_contenders()
    rows, report, cmd = bench_main("bench_step", step_argv(a) + ["--contenders", ",".join(names)])
    return result(rows, "\n".join([report, *notes]), cmd + " --contenders " + ",".join(names), notes=notes)


def part_syncs(a) -> dict:
    import torch
    import bench_step
    import harness as H
    from contenders import Project, make_images, n_images
    s = bench_step.parse_args(step_argv(a))
    c, phases = Project(s, make_images(n_images(s), s.img_size, s.seed), s.queue), Project.phases()
    shares, step_ms = H.phase_shares(c, phases, s.device, 2 if not a.dry_run else 1, s.steps, s.warmup, rest="rest: data, fastai, callbacks")
    lines = [f"Project step by phase, queue {s.queue} (timed without profiler, median over rounds; step {step_ms:.0f} ms):", "",
             "| phase | % of step | ms per step | syncs per step |", "|---|---|---|---|"]
    syncs = H.count_syncs(c, phases, s.warmup + s.steps, rest="rest: data, fastai, callbacks") if s.device.type == "cuda" else {}
    for k in dict.fromkeys([*shares, *syncs]):
        v = shares.get(k, 0.)
        lines.append(f"| {k} | {v:.1f} | {v * step_ms / 100:.1f} | {syncs[k]:.1f} |" if k in syncs else
                     f"| {k} | {v:.1f} | {v * step_ms / 100:.1f} | {'-' if s.device.type != 'cuda' else 0} |")
    total = sum(syncs.values()) if syncs else None
    lines.append("" if total is None else f"\nHost-device syncs per step: {total:.0f}")
    if total is None: lines.append("(syncs are counted on CUDA only: `torch.cuda.set_sync_debug_mode`)")
    print("\n".join(lines))
    del c; gc.collect()
    if torch.cuda.is_available(): torch.cuda.empty_cache()
    return result(dict(step_ms=step_ms, shares=shares, syncs_per_step=syncs, total_syncs=total), "\n".join(lines),
                  "python bench/bench_step.py " + " ".join(step_argv(a)) + " --profile   (phases and syncs part)")


def part_memory(a) -> dict:
    import torch
    import bench_step
    names, notes = step_contenders()
    rows = []
    for name in names:
        s = bench_step.parse_args(step_argv(a) + ["--contenders", name])
        s.only, s.queue_modes, s.rounds = name, "on", 1
        gc.collect()
        if torch.cuda.is_available(): torch.cuda.empty_cache(); base = torch.cuda.memory_allocated()
        r = bench_step.bench_one_memory(s)
        if torch.cuda.is_available(): r["cuda_left_mib"] = (torch.cuda.memory_allocated() - base) / 2**20
        rows.append(r)
        gc.collect()
    cuda = torch.cuda.is_available() and not a.dry_run
    lines = [f"Peak memory of the step (queue on, contenders one after another in one process, {s.warmup} + {s.steps} steps each):", "",
             "| contender | step ms | CUDA peak MiB | max RSS MiB (process so far) |", "|---|---|---|---|"]
    lines += [f"| {r['contender']} | {r['step_ms']:.0f} | {r['cuda_peak_mib']:.0f} | {r['max_rss_mib']:.0f} |" if cuda else
              f"| {r['contender']} | {r['step_ms']:.0f} | - | {r['max_rss_mib']:.0f} |" for r in rows]
    lines += notes
    print("\n".join(lines))
    return result(rows, "\n".join(lines), "python bench/gpu_check.py --parts memory   (bench_step.bench_one_memory per contender)")


def part_augs(a) -> dict:
    argv = ["--tiny"] if a.dry_run else ["--config", "gpu", "--device", "cuda", "--modes", "all", "--batches", "3", "--rounds", "2"]
    from contenders import ORIGINAL_MISSING, original_available
    original = original_available()
    names = ["project", "project-before", "official"] + (["original"] if original else [])
    notes = [] if original else [ORIGINAL_MISSING]
    problem = lightly_problem()
    if problem: notes.append(problem)
    else: names.append("lightly")
    for n in notes: print(n)
    rows, report, cmd = bench_main("bench_augs", argv + ["--contenders", ",".join(names)])
    return result(rows, "\n".join([report, *notes]), cmd)


def fm_root(a) -> Path | None:
    for root in ([Path(a.fm_root)] if a.fm_root else FM_ROOTS):
        if all((root / f"{s}-{k}-idx{d}-ubyte.gz").is_file() for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))):
            return root
    return None


def dry_run_data(root: Path, n_train: int = 384, n_test: int = 200) -> tuple:
    "A few test images as (x_train, y_train, x_test, y_test): reading the 60k training images alone takes seconds"
    import numpy as np
    import torch
    import fashion_mnist as fm
    n = n_train + n_test
    x = torch.from_numpy(fm.read_idx(root / "t10k-images-idx3-ubyte.gz")[:n].copy()).float().div_(255).unsqueeze(1)
    y = torch.from_numpy(fm.read_idx(root / "t10k-labels-idx1-ubyte.gz")[:n].astype(np.int64))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def part_fashion_mnist(a) -> dict:
    root = fm_root(a)
    if root is None: return skipped(FM_MISSING.format(roots=", ".join(map(str, [a.fm_root] if a.fm_root else FM_ROOTS))))
    import torch
    import fashion_mnist as fm
    from bench_clusters import n_train_for
    from self_supervised_swav.swav import get_swav_aug_pipelines
    load = fm.load_fashion_mnist
    data = load(root) if not a.dry_run else dry_run_data(root)
    dev = device_of(a)
    # dry run: n_train_for times 6 steps of a copy, 6 batches of the 384 images; GPU: kNN and the probe run on the CPU's cores
    small = ["--bs", "32"] if a.dry_run else ["--threads", str(os.cpu_count() or 1)]
    probe = fm.parse(["--device", dev, "--skip_baselines", "--out", "", *fm.CHOSEN, *small])
    augs = get_swav_aug_pipelines(num_crops=probe.num_crops, crop_sizes=probe.crop_sizes, min_scales=probe.min_scales,
                                  max_scales=probe.max_scales, stats=fm.STATS, jitter_s=probe.jitter_s, blur=False)
    probe.minutes, probe.epochs = a.fm_minutes, 1
    _, step = n_train_for(probe, fm.build_encoder(probe).to(dev), data[0], probe.n_protos, augs, torch.device(dev))
    steps_per_epoch = len(data[0]) // probe.bs
    epochs = max(1, int(a.fm_minutes * 60 / (step * steps_per_epoch)))
    n_train = len(data[0]) if epochs > 1 or step * steps_per_epoch <= a.fm_minutes * 60 else max(probe.bs, int(a.fm_minutes * 60 / step) * probe.bs)
    if a.dry_run: epochs, n_train = 1, len(data[0])
    argv = ["--device", dev, "--epochs", str(epochs), "--n_train", str(n_train), "--skip_baselines", "--bn_recal", str(min(n_train, 20000)),
            "--probe_epochs", "2" if a.dry_run else "10", "--out", "", *fm.CHOSEN, *small]
    print(f"Fashion-MNIST from {root}: {step * 1e3:.1f} ms per step, so {epochs} epochs of {n_train} images for {a.fm_minutes} min")
    fm.load_fashion_mnist = lambda root=root: data           # fm.main reads the data through this name
    try:
        res = fm.main(fm.parse(argv))
    finally: fm.load_fashion_mnist = load
    cmd = "python bench/fashion_mnist.py " + " ".join(argv)
    md = "\n".join([f"Fashion-MNIST, {res['pretraining_seconds']} s of pretraining on {dev} ({epochs} epochs of {n_train} images, "
                    f"{step * 1e3:.1f} ms per step; the configuration chosen on CPU otherwise), {len(data[2])} test images "
                    "(baselines not rerun: raw pixels are the CPU run's):", "", "| encoder | kNN top-1 | linear probe top-1 |", "|---|---|---|",
                    *[f"| {k} | {res[k]['knn_top1']:.4f} | {res[k]['linear_probe_top1']:.4f} |"
                      for k in ("pretrained_encoder", "pretrained_encoder_bn_recalibrated") if k in res]])
    print(md)
    return result(res, md, cmd, step_ms=step * 1e3, epochs=epochs, n_train=n_train, data=str(root))


RUN = dict(env=part_env, tests=part_tests, sinkhorn=part_sinkhorn, step=part_step, syncs=part_syncs, memory=part_memory,
           augs=part_augs, fashion_mnist=part_fashion_mnist)


# ---- running the parts
def run_here(name: str, a) -> dict:
    "One part in this process; an exception becomes a failed part"
    import traceback
    t = time.perf_counter()
    try: res = RUN[name](a)
    except Exception as e:   # a broken part is reported, the others still run
        traceback.print_exc()
        res = result(status="failed", message=f"{type(e).__name__}: {e}"[:2000])
    res["seconds"] = round(time.perf_counter() - t, 1)
    return res


def run_capped(name: str, a, cap: float, log) -> dict:
    "One part in a fresh process killed after `cap` seconds; its output goes to `log`"
    with tempfile.TemporaryDirectory() as tmp:
        res_file = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--part", name, "--result", str(res_file), "--fm-minutes", str(a.fm_minutes)]
        if a.fm_root: cmd += ["--fm-root", a.fm_root]
        t = time.perf_counter()
        # a session of its own, so that the part's children (pytest, DataLoader workers) are killed with it
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        def kill(*_):
            with contextlib.suppress(ProcessLookupError): os.killpg(proc.pid, signal.SIGKILL)
        old = signal.signal(signal.SIGTERM, lambda *_: (kill(), sys.exit(143)))   # an outer `timeout` takes the part down too
        try: rc = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            kill(); proc.wait()
            return result(status="timeout", message=f"killed at its cap of {cap:.0f} s", seconds=round(time.perf_counter() - t, 1))
        finally: signal.signal(signal.SIGTERM, old)
        kill()                                             # what the part left running (DataLoader workers)
        if res_file.is_file(): return json.loads(res_file.read_text()) | dict(wall_seconds=round(time.perf_counter() - t, 1))
        return result(status="failed", message=f"exited with {rc} and no result (see gpu_check.log)", seconds=round(time.perf_counter() - t, 1))


def markdown(results: dict, a) -> str:
    "The report: a summary table, then each part's section"
    env = results.get("env", {}).get("rows") or {}
    head = [f"# GPU check ({'dry run on CPU, tiny sizes: figures mean nothing' if a.dry_run else env.get('gpu', 'GPU')})", "",
            "Command: `make gpu-check` (`python bench/gpu_check.py" + (" --dry-run" if a.dry_run else "") + "`); "
            "every ratio below is measured within one run.", "", "| part | status | seconds | note |", "|---|---|---|---|"]
    head += [f"| {k} | {r['status']} | {r.get('seconds', 0):.0f} | {r.get('message', '')[:160].replace('|', '/')} |" for k, r in results.items()]
    body = []
    for k, r in results.items():
        body += ["", f"## {k}", ""] + ([f"`{r['command']}`", ""] if r.get("command") else []) + [r.get("markdown") or r.get("message", "")]
    return "\n".join(head + body) + "\n"


def write(results: dict, a, out: Path, started: float):
    out.mkdir(parents=True, exist_ok=True)
    doc = dict(dry_run=a.dry_run, seconds=round(time.perf_counter() - started, 1), parts=results)
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(results, a))


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.part:                                            # a child: one part, its result to a file
        Path(a.result).write_text(json.dumps(run_here(a.part, a), default=str)); return {}
    started, out = time.perf_counter(), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.dry_run:
        import harness as H
        H.set_threads(1)
    results = {}
    here = a.dry_run or a.in_process
    with contextlib.nullcontext() if here else open(out / "gpu_check.log", "a") as log:   # the parts' own output, on the GPU
        for name in [p for p in PARTS if p in a.parts.split(",")]:
            left = a.budget - (time.perf_counter() - started)
            cap = min(CAPS[name] * a.cap_scale, left)
            print(f"== {name} (cap {cap:.0f} s, {left:.0f} s left)", flush=True)
            if left < 5: results[name] = result(status="timeout", message="no time left in --budget", seconds=0.)
            elif here: results[name] = run_here(name, a)
            else:
                log.flush(); results[name] = run_capped(name, a, cap, log)
            r = results[name]
            print(f"== {name}: {r['status']} in {r.get('seconds', 0):.0f} s {r.get('message', '')[:300]}", flush=True)
            write(results, a, out, started)               # after every part: a killed run still leaves the parts done
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    done = main()
    sys.exit(1 if any(r["status"] in ("failed", "timeout") for r in done.values()) else 0)   # a part broke: say so to the caller
