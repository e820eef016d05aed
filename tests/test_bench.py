"""The benchmark scripts in bench/ run (each on its `--tiny` configuration, in a subprocess), and the code they
measure against is right: the plain official Sinkhorn, and the local copies of the changes they recommend.

Speed is never asserted here: the figures are in BENCHMARKS.md. Without lightly installed (the dev environment),
the scripts skip lightly's rows with a message, which is checked too.
"""
from __future__ import annotations
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
HAVE_LIGHTLY = importlib.util.find_spec("lightly") is not None


def run_script(name: str, *args: str, lightly_rows: bool = True, timeout: float = 600) -> str:
    "Run `bench/name --tiny args` with this interpreter; its stdout (the report)"
    out = subprocess.run([sys.executable, str(BENCH / name), "--tiny", *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{name} failed:\n{out.stdout}\n{out.stderr[-3000:]}"
    if lightly_rows and not HAVE_LIGHTLY: assert "lightly is not installed" in out.stdout
    return out.stdout


def table_rows(report: str) -> list[list[str]]:
    "Cells of the markdown table rows of a report, header and rule lines left out"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in report.splitlines() if line.startswith("| ")]
    return [r for r in rows if not set("".join(r)) <= set("-")][1:]


def test_bench_step_speed():
    report = run_script("bench_step.py", "--optimized")
    rows = table_rows(report)
    names = {(r[0], r[1]) for r in rows}
    expected = {"project", "floor", "project+opt"} | ({"lightly"} if HAVE_LIGHTLY else set())
    assert names == {(q, c) for q in ("off", "8") for c in expected}
    assert all(float(r[2]) > 0 for r in rows)


def test_bench_step_memory():
    rows = table_rows(run_script("bench_step.py", "--memory", "--contenders", "project,lightly"))
    assert [r[0] for r in rows] == ["project"] + (["lightly"] if HAVE_LIGHTLY else [])
    assert all(float(r[3]) >= float(r[1]) > 0 for r in rows)   # max RSS >= RSS after imports


def test_bench_step_profile():
    report = run_script("bench_step.py", "--profile", lightly_rows=False)
    assert "| augmentation (SWAV._make_crops) |" in report and "aten::" in report


def test_bench_augs():
    rows = table_rows(run_script("bench_augs.py"))
    assert [r[1] for r in rows] == ["project", "official"] + (["lightly"] if HAVE_LIGHTLY else [])


def test_bench_sinkhorn():
    rows = table_rows(run_script("bench_sinkhorn.py", "--optimized", lightly_rows=False))
    assert len(rows) == 2 * 2   # (B=16, B=8+24q) x (float32, bfloat16)
    for r in rows: assert float(r[-2]) < 1e-5   # the project's codes match the official algorithm in float64


def test_bench_scaling():
    rows = [r for r in table_rows(run_script("bench_scaling.py", lightly_rows=False)) if r[0].isdigit()]
    assert [int(r[0]) for r in rows] == [2, 4, 10, 40, 0, 8]   # --tiny: small crops, n_protos, queue lengths


# ---- what the benchmarks compare against, and the changes they recommend
def test_official_sinkhorn_matches_project():
    from bench_sinkhorn import official_sinkhorn, scores_for, sinkhorn_recommended
    from self_supervised_swav.swav import sinkhorn_knopp
    for n, k in [(16, 10), (5, 40), (64, 3)]:
        s = scores_for(n, k, torch.device("cpu"))
        q = sinkhorn_knopp(s)
        torch.testing.assert_close(official_sinkhorn(s.double()).float(), q, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(sinkhorn_recommended(s), q, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sinkhorn_recommended(s.bfloat16()), sinkhorn_knopp(s.bfloat16()), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sinkhorn_recommended(torch.stack([s, 2 * s])), sinkhorn_knopp(torch.stack([s, 2 * s])))


@pytest.mark.parametrize("ids", [[0, 1], [3, 1], [2]])
@pytest.mark.parametrize("queue", [False, True])
def test_recommended_codes_and_loss_match_library(ids, queue):
    from bench_step import swav_codes_no_index, swav_loss_no_index
    from self_supervised_swav.swav import swav_codes, swav_loss
    torch.manual_seed(0)
    scores = torch.randn(4 * 5, 30, requires_grad=True)
    qs = torch.randn(len(ids), 7, 30) if queue else None
    codes = swav_codes(scores, 5, ids, queue_scores=qs)
    torch.testing.assert_close(swav_codes_no_index(scores, 5, ids, queue_scores=qs), codes, rtol=0, atol=0)
    loss, new = swav_loss(scores, codes, ids), swav_loss_no_index(scores, codes, ids)
    torch.testing.assert_close(new, loss)
    torch.testing.assert_close(torch.autograd.grad(new, scores)[0], torch.autograd.grad(loss, scores)[0])


def test_grouped_crops_match_pipelines():
    "One call per group of identical pipelines gives the crops the pipelines give: shapes, per-crop randomness"
    from bench_step import make_crops_grouped, pipeline_groups
    from self_supervised_swav.swav import get_swav_aug_pipelines
    class Holder: pass
    h = Holder()
    h._aug_groups = None
    h.augs = get_swav_aug_pipelines(num_crops=[2, 3], crop_sizes=[16, 8], min_scales=[0.3, 0.05], max_scales=[1., 0.3])
    x = torch.rand(4, 3, 20, 20)
    crops = make_crops_grouped(h, x)
    assert [tuple(c.shape) for c in crops] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 3
    assert not torch.equal(crops[0], crops[1]) and not torch.equal(crops[2], crops[3])
    assert pipeline_groups(h.augs) == [(0, 2), (2, 5)]
    h.augs = get_swav_aug_pipelines(num_crops=[2, 3], crop_sizes=[16, 8], min_scales=[0.3, 0.05], max_scales=[1., 0.3],
                                    same_on_batch=True)   # same parameters for a whole call: must not be grouped
    assert pipeline_groups(h.augs) == [(i, i + 1) for i in range(5)]
    h._aug_groups = None
    crops = make_crops_grouped(h, x)
    assert [tuple(c.shape) for c in crops] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recommended_codes_match_swav_codes(dtype):
    from bench_sinkhorn import codes_recommended, scores_for
    from self_supervised_swav.swav import swav_codes
    s = scores_for(3 * 6, 12, torch.device("cpu")).to(dtype)
    qs = scores_for(2 * 9, 12, torch.device("cpu"), seed=1).to(dtype).view(2, 9, 12)
    for ids, q in [([0, 1], qs), ([2, 0], qs), ([1], None)]:
        torch.testing.assert_close(codes_recommended(s, 6, ids, q), swav_codes(s, 6, ids, queue_scores=q), rtol=1e-5, atol=1e-7)
