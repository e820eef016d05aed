"""The benchmark scripts in bench/ run (each on its `--tiny` configuration), and the code they measure against is
right: the plain official Sinkhorn.

The scripts are called in this process through their `main(argv)` (a fresh interpreter spends ~10 s importing torch,
fastai and timm), except for `--memory`, which measures a fresh process and starts one per contender itself, and one
run as a script to check the `__main__` entry. `bench/ddp_cpu.py` is run by `tests/test_distributed.py`.

Speed is never asserted here: the figures are in BENCHMARKS.md. Without lightly installed (the dev environment),
the scripts skip lightly's rows with a message, which is checked too.
"""
from __future__ import annotations
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"   # importable by name too: pytest's `pythonpath`
HAVE_LIGHTLY = importlib.util.find_spec("lightly") is not None
HAVE_ORIGINAL = importlib.util.find_spec("self_supervised") is not None   # the original library (bench environment only)


def check_lightly_message(report: str, lightly_rows: bool):
    if lightly_rows and not HAVE_LIGHTLY: assert "lightly is not installed" in report


def run_script(name: str, *args: str, lightly_rows: bool = True, timeout: float = 600) -> str:
    "Run `bench/name --tiny args` as a script with this interpreter; its stdout (the report)"
    out = subprocess.run([sys.executable, str(BENCH / name), "--tiny", *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{name} failed:\n{out.stdout}\n{out.stderr[-3000:]}"
    check_lightly_message(out.stdout, lightly_rows)
    return out.stdout


@pytest.fixture
def run_main(capsys):
    "Call `bench/name`'s `main(['--tiny', *args])` in this process; its stdout (the report). Torch's thread count is restored"
    def run(name: str, *args: str, lightly_rows: bool = True) -> str:
        threads = torch.get_num_threads()
        try: importlib.import_module(name.removesuffix(".py")).main(["--tiny", *args])
        finally: torch.set_num_threads(threads)
        report = capsys.readouterr().out
        check_lightly_message(report, lightly_rows)
        return report
    return run


def table_rows(report: str) -> list[list[str]]:
    "Cells of the markdown table rows of a report, header and rule lines left out"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in report.splitlines() if line.startswith("| ")]
    return [r for r in rows if not set("".join(r)) <= set("-")][1:]


def test_bench_step_speed(run_main):
    rows = table_rows(run_main("bench_step.py"))
    names = {(r[0], r[1]) for r in rows}
    expected = {"project", "floor"} | ({"lightly"} if HAVE_LIGHTLY else set()) | ({"original"} if HAVE_ORIGINAL else set())
    assert names == {(q, c) for q in ("off", "8") for c in expected}
    assert all(float(r[2]) > 0 for r in rows)


def test_bench_step_memory():
    rows = table_rows(run_script("bench_step.py", "--memory", "--contenders", "project,lightly"))
    assert [r[0] for r in rows] == ["project"] + (["lightly"] if HAVE_LIGHTLY else [])
    assert all(float(r[3]) >= float(r[1]) > 0 for r in rows)   # max RSS >= RSS after imports


def test_bench_step_profile(run_main):
    report = run_main("bench_step.py", "--profile", lightly_rows=False)
    assert "| augmentation (MultiCrop.__call__) |" in report and "aten::" in report
    shares = {r[0]: float(r[1]) for r in table_rows(report) if len(r) == 3}
    assert all(shares[k] > 0 for k in ("augmentation (MultiCrop.__call__)", "model forward (SwAVModel.forward)",
                                       "queue (SwAVQueue.scores, push)", "Sinkhorn codes (swav_codes)", "backward (Tensor.backward)"))


def test_bench_augs(run_main):
    report = run_main("bench_augs.py")
    rows = table_rows(report)
    assert [r[1] for r in rows] == (["project", "project-ungrouped", "project-before"] + (["original"] if HAVE_ORIGINAL else [])
                                    + ["official"] + (["lightly"] if HAVE_LIGHTLY else []))
    if not HAVE_ORIGINAL: assert "the original library is not installed" in report


def test_bench_sinkhorn():
    rows = table_rows(run_script("bench_sinkhorn.py", lightly_rows=False))
    assert len(rows) == 2 * 2   # (B=16, B=8+24q) x (float32, bfloat16)
    for r in rows: assert float(r[-2]) < 1e-5   # the project's codes match the official algorithm in float64


def test_bench_scaling(run_main):
    rows = [r for r in table_rows(run_main("bench_scaling.py", lightly_rows=False)) if r[0].isdigit()]
    assert [int(r[0]) for r in rows] == [2, 4, 10, 40, 0, 8]   # --tiny: small crops, n_protos, queue lengths


# ---- what the benchmarks compare against
def test_official_side_of_bench_sinkhorn_matches_the_project():
    """What bench_sinkhorn times as the official side is the official algorithm and gives the project's codes: with a queue
    (`official_codes`: Sinkhorn over queue + batch, the batch's rows kept) and without; in float32 it stays within
    rounding of float64; its codes are distributions over the prototypes and spread the batch evenly over them"""
    from bench_sinkhorn import EPS, N_ITERS, official_codes, scores_for
    from self_supervised_swav.reference import official_sinkhorn, official_sinkhorn_in_dtype
    from self_supervised_swav.swav import sinkhorn_knopp, swav_codes
    for n, k in [(16, 10), (5, 40), (64, 3)]:
        s = scores_for(n, k, torch.device("cpu"))
        q64 = official_sinkhorn(s, EPS, N_ITERS)
        assert q64.dtype == torch.float64 and not torch.equal(official_sinkhorn_in_dtype(s, EPS, N_ITERS).double(), q64)  # float32 ran
        torch.testing.assert_close(official_sinkhorn_in_dtype(s, EPS, N_ITERS).double(), q64, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(q64.sum(1), torch.ones(n, dtype=torch.float64))               # each sample: a distribution
        torch.testing.assert_close(q64.sum(0), torch.full((k,), n / k, dtype=torch.float64), rtol=0.1, atol=0.05 * n / k)  # near equal share
        torch.testing.assert_close(sinkhorn_knopp(s, EPS, N_ITERS), q64.float(), rtol=1e-4, atol=1e-6)
    bs, queue, k = 8, 24, 10
    s, qs = scores_for(2 * bs, k, torch.device("cpu")), scores_for(2 * queue, k, torch.device("cpu"), seed=1).view(2, queue, k)
    with_queue = official_codes(s.double(), qs.double(), bs)
    assert with_queue.shape == (2, bs, k) and not torch.allclose(with_queue, official_codes(s.double(), None, bs))   # the queue counts
    torch.testing.assert_close(swav_codes(s, bs, [0, 1], EPS, N_ITERS, qs), with_queue.float(), rtol=1e-4, atol=1e-6)


def test_harness_interleaves_and_pairs():
    "Rounds rotate the contenders' order; the paired ratio is the median over rounds of the ratio within a round"
    import harness as H
    order = []
    class C:
        def __init__(self, name, t): self.name, self.t = name, t
        def run(self, n): order.append(self.name); return [self.t] * n
    times = H.run_interleaved([C("a", 2.), C("b", 1.)], rounds=3, n=2, warmup=1, quiet=True)
    assert order == ["a", "b", "b", "a", "a", "b"] and times["a"] == [[2., 2.]] * 3
    assert H.paired_ratio([[2.], [6.], [4.]], [[1.], [2.], [4.]]) == 2.


def test_bench_step_memory_child_settings():
    "--memory hands each child process the parsed settings (not an edited argv): they round-trip, changed where it says"
    import json
    import bench_step
    a = bench_step.parse_args(["--tiny", "--bs", "3", "--channels-last", "--memory", "--json", "x.json"])
    child = bench_step.parse_args(["--child", json.dumps(bench_step.memory_child(a, "floor"))])
    assert (child.only, child.bs, child.channels_last, child.tiny, child.queue_modes) == ("floor", 3, True, True, "on")
    assert not child.memory and child.json is None and child.n_protos == a.n_protos


def test_fashion_mnist_settings(tmp_path):
    "bench/fashion_mnist.py's defaults are the configuration BENCHMARKS.md reports; its results file is written (the data is not needed)"
    import json
    import fashion_mnist as fm
    a = fm.parse([])
    assert (a.arch, a.channels, a.no_stem_pool, a.n_protos, a.num_crops, a.crop_sizes) == ("resnet10t", [32, 64, 128, 256], True, 30, [2, 2], [28, 14])
    assert (a.bs, a.lr, a.epochs, a.K, a.threads) == (128, 2e-3, 3, 0, 1)
    fm.write_results(dict(x=1), str(tmp_path / "d" / "r.json"))
    assert json.loads((tmp_path / "d" / "r.json").read_text()) == dict(x=1)


def test_fashion_mnist_encoder_options():
    "build_encoder: without the stem max-pool a 28 px image leaves a 2x2 last map, 4x4 with --output_stride 16; CatAvgMax doubles the features"
    import fashion_mnist as fm
    x = torch.rand(2, 1, 28, 28)
    def maps(*argv): return fm.build_encoder(fm.parse(list(argv))).eval().forward_features(x).shape[-2:]
    assert maps() == (2, 2) and maps("--output_stride", "16") == (4, 4) and maps("--stem_pool") == (1, 1)
    assert fm.build_encoder(fm.parse([])).eval()(x).shape == (2, 256)
    assert fm.build_encoder(fm.parse(["--pool", "catavgmax"])).eval()(x).shape == (2, 512)


def test_run_overheads_script(run_main):
    "bench_run_overheads --tiny: the folder's start-up and one checkpoint are measured and reported"
    rows = dict(table_rows(run_main("bench_run_overheads.py", lightly_rows=False)))
    assert rows["files"] == "200" and float(rows["one checkpoint (s)"]) > 0 and float(rows["checkpoint size (MiB)"]) > 1
    assert 0 < float(rows["checkpoint / epoch"]) < 1


def test_semi_supervised_subset():
    "The labelled subsets of bench/semi_supervised.py are class-balanced, fixed by the seed, and refuse an uneven size"
    import semi_supervised as ss
    y = torch.arange(1000) % 10
    idx = ss.balanced_subset(y, 60, seed=0)
    assert len(idx.unique()) == 60 and torch.bincount(y[idx], minlength=10).tolist() == [6] * 10
    assert torch.equal(idx, ss.balanced_subset(y, 60, seed=0)) and not torch.equal(idx, ss.balanced_subset(y, 60, seed=1))
    with pytest.raises(SystemExit, match="multiple of the 10 classes"): ss.balanced_subset(y, 65)


def test_semi_supervised_finetune():
    "bench/semi_supervised.py fine-tunes an encoder on labelled images and returns its test top-1, well above chance on images whose class is their brightness"
    import argparse
    import semi_supervised as ss
    from torch import nn
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    x = (torch.rand(40, 1, 28, 28, generator=g) * 0.2 + y.view(-1, 1, 1, 1) * 0.6).clamp(0, 1)   # the class is the brightness
    args = argparse.Namespace(bs=20, wd=0., lr=1e-2)
    enc = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    acc = ss.finetune(enc, x, y, x, y, 10, args, seed=0)
    assert 0 <= acc <= 1
    assert acc >= 0.9   # chance is 0.5: fine-tuning learns


def test_bench_decode(run_main):
    "bench_decode --tiny: draft and full decoding, and the folder loader (default workers, and reading the cache) against the in-memory floor"
    rows = table_rows(run_main("bench_decode.py", lightly_rows=False))
    decode, train = [r for r in rows if r[1] in ("full", "draft")], [r for r in rows if r[2] == "memory" or r[2].startswith("folder")]
    assert [r[1] for r in decode] == ["full", "draft"] and all(float(r[2]) > 0 and float(r[3]) > 0 for r in decode)
    assert [r[2] for r in train][0] == "memory" and train[1][2].startswith("folder, default (") and train[2][2].startswith("folder, --cache (")
    assert len(train) == 3
    assert all(float(r[3]) > 0 and 0 <= float(r[4]) <= 100 and float(r[5]) > 0 for r in train)


def test_bench_cache(run_main):
    rows = dict(table_rows(run_main("bench_cache.py", lightly_rows=False)))
    assert rows["images (training)"] == "10" and float(rows["epoch time, cache / decode (paired)"]) > 0


def test_bench_step_bf16_rows(capsys):
    "`--precisions fp32,bf16`: every contender also in bf16 (CPU autocast), with its speed-up over itself in float32 (crops of the CPU config: 32 px is bf16-safe for resnet18)"
    import bench_step
    threads = torch.get_num_threads()
    try: bench_step.main(["--bs", "2", "--n-protos", "20", "--hidden", "32", "--steps", "1", "--warmup", "0", "--rounds", "1",
                          "--queue-modes", "off", "--contenders", "project,floor", "--precisions", "fp32,bf16"])
    finally: torch.set_num_threads(threads)
    rows = {r[1]: r for r in table_rows(capsys.readouterr().out)}
    assert set(rows) == {"project", "floor", "project bf16", "floor bf16"}
    assert float(rows["project bf16"][-1]) > 0 and rows["project"][-1] == "-"
    assert float(rows["project bf16"][-2]) > 0   # against the floor in bf16
