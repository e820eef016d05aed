"""SwAV under torch.distributed on CPU: 2 gloo processes against 1 process holding the whole batch.

The processes are started with `torch.multiprocessing` and the *fork* start method by default: children
inherit the already imported torch/fastai/kornia, which takes about 15 s per process to import again under
*spawn* on a 2-core machine. Set `SWAV_TEST_START_METHOD=spawn` to check the spawn path (slower).
fastai's `DistributedDL` calls `.cuda()`, so these tests drive DDP directly: the model is wrapped in
`DistributedDataParallel` by hand and each process gets its own data.
"""
from __future__ import annotations
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from fastai.callback.progress import ProgressCallback  # noqa: F401  (patches Learner.no_bar)
from fastai.learner import Learner
from fastai.torch_core import get_model, set_seed

from self_supervised_swav.data import image_tensor_dls
from self_supervised_swav.distributed import all_gather_stack, is_distributed, is_main_process, world_rank
from self_supervised_swav.swav import SWAV, sinkhorn_knopp, swav_codes, swav_loss
from harness import run_gloo, save_result as _save
from helpers import official_sinkhorn, tiny_pipelines, tiny_swav_model

REPO = Path(__file__).resolve().parents[1]


def _unit(*shape) -> torch.Tensor: return F.normalize(torch.randn(*shape), dim=-1)

CROP_IDS = [0, 1]


# ---- the run's processes: one notion, from the launcher before the process group starts, from the group after

def _processes_worker(rank, world, out_dir):
    _save(out_dir, rank, world_rank=world_rank(), distributed=is_distributed(), main=is_main_process(),
          gathered=all_gather_stack(torch.tensor([rank, 10 * rank])))


def test_process_helpers_in_two_processes(tmp_path):
    r0, r1 = run_gloo(_processes_worker, tmp_path)
    assert (r0["world_rank"], r1["world_rank"]) == ((2, 0), (2, 1))
    assert r0["distributed"] and r1["distributed"] and (r0["main"], r1["main"]) == (True, False)
    for r in (r0, r1): assert torch.equal(r["gathered"], torch.tensor([[0, 0], [1, 10]]))


def test_process_helpers_launched_before_the_group(monkeypatch):
    "torchrun's variables without a process group yet: a rank of the launched run, no collectives"
    assert (world_rank(), is_distributed(), is_main_process()) == ((1, 0), False, True)
    monkeypatch.setenv("WORLD_SIZE", "4"); monkeypatch.setenv("RANK", "3")
    assert (world_rank(), is_distributed(), is_main_process()) == ((4, 3), False, False)
    assert torch.equal(all_gather_stack(torch.arange(2)), torch.arange(2)[None])


# ---- Sinkhorn, codes and loss: 2 processes == 1 process
def _codes_worker(rank, world, out_dir, scores, queues, protos, eps):
    "Each rank: its half of every crop's scores and its own queue; Sinkhorn all-reduces over both"
    n_crops, B, K = scores.shape
    bs = B // world
    local = scores[:, rank * bs:(rank + 1) * bs].reshape(-1, K)               # crop after crop
    queue_scores = queues[rank] @ protos.T if queues is not None else None   # [A, Kq, K], this rank's queue
    codes = swav_codes(local, bs, CROP_IDS, eps=eps, n_sinkh_iter=3, queue_scores=queue_scores)
    loss = swav_loss(local, codes, CROP_IDS)
    mean_loss = loss.clone(); dist.all_reduce(mean_loss); mean_loss /= world   # what DDP's gradient averaging optimises
    _save(out_dir, rank, sk=sinkhorn_knopp(scores[0, rank * bs:(rank + 1) * bs], eps=eps), codes=codes, loss=loss, mean_loss=mean_loss)

@pytest.mark.parametrize("eps", [0.05, 0.01])
@pytest.mark.parametrize("queue_len", [0, 24])
def test_codes_and_loss_match_single_process(tmp_path, queue_len, eps):
    "Sinkhorn over 2 ranks solves the problem on the union of their rows: the codes and loss of 1 process on the whole batch"
    torch.manual_seed(0)
    n_crops, B, K, D = 4, 12, 10, 16
    protos = _unit(K, D)
    scores = _unit(n_crops, B, D) @ protos.T                              # [n_crops, B, K]
    queues = [_unit(len(CROP_IDS), queue_len, D) for _ in range(2)] if queue_len else None
    r0, r1 = run_gloo(_codes_worker, tmp_path, scores, queues, protos, eps)

    # plain sinkhorn_knopp: the two halves' codes are the rows of the whole batch's codes
    whole = sinkhorn_knopp(scores[0], eps=eps)
    torch.testing.assert_close(torch.cat([r0["sk"], r1["sk"]]), whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(whole, official_sinkhorn(scores[0], eps).float(), atol=1e-4, rtol=1e-4)

    # swav_codes: the global problem is the union of every rank's [queue; batch] rows, whatever their order
    bs = B // 2
    all_queue_scores = torch.cat([q @ protos.T for q in queues], dim=1) if queues else None
    ref_codes = swav_codes(scores.reshape(-1, K), B, CROP_IDS, eps=eps, queue_scores=all_queue_scores)
    torch.testing.assert_close(torch.cat([r0["codes"], r1["codes"]], dim=1), ref_codes, atol=1e-6, rtol=1e-5)
    for a, crop in enumerate(CROP_IDS):   # independent reference: official float64 Sinkhorn on [q0; b0; q1; b1]
        parts = [t for r in range(2) for t in ((queues[r][a] @ protos.T,) if queues else ()) + (scores[crop, r * bs:(r + 1) * bs],)]
        ref = official_sinkhorn(torch.cat(parts), eps).float()
        rows = [ref[queue_len:queue_len + bs], ref[2 * queue_len + bs:]]
        torch.testing.assert_close(torch.cat([r0["codes"][a], r1["codes"][a]]), torch.cat(rows), atol=1e-4, rtol=1e-4)

    # the loss: mean of the ranks' losses (DDP averages their gradients) == loss of the whole batch
    ref_loss = swav_loss(scores.reshape(-1, K), ref_codes, CROP_IDS)
    for r in (r0, r1): torch.testing.assert_close(r["mean_loss"], ref_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close((r0["loss"] + r1["loss"]) / 2, ref_loss, atol=1e-6, rtol=1e-5)


# ---- DDP end to end: loss and gradients of 2 ranks == 1 process on the whole batch
def _ddp_grads_worker(rank, world, out_dir, state, crops, queues):
    model = tiny_swav_model(); model.load_state_dict(state)
    ddp = DDP(model)
    bs = crops[0].shape[0] // world
    _, scores = ddp([c[rank * bs:(rank + 1) * bs] for c in crops])
    queue_scores = queues[rank] @ model.prototypes.weight.detach().t()
    codes = swav_codes(scores, bs, CROP_IDS, queue_scores=queue_scores)
    loss = swav_loss(scores, codes, CROP_IDS)
    loss.backward()
    _save(out_dir, rank, loss=loss.detach(), codes=codes, grads={n: p.grad.clone() for n, p in model.named_parameters()})

def test_ddp_gradients_match_single_process(tmp_path):
    "Plain loop, no fastai: a SwAVModel (no BatchNorm) in DDP on 2 ranks gets the gradients of 1 process on the whole batch"
    torch.manual_seed(0)
    model = tiny_swav_model()
    crops = [torch.rand(8, 1, 16, 16) for _ in range(2)] + [torch.rand(8, 1, 8, 8) for _ in range(2)]
    queues = [_unit(len(CROP_IDS), 12, 16) for _ in range(2)]
    r0, r1 = run_gloo(_ddp_grads_worker, tmp_path, model.state_dict(), crops, queues)

    _, scores = model(crops)
    queue_scores = torch.cat([q @ model.prototypes.weight.detach().t() for q in queues], dim=1)
    codes = swav_codes(scores, 8, CROP_IDS, queue_scores=queue_scores)
    loss = swav_loss(scores, codes, CROP_IDS)
    loss.backward()
    torch.testing.assert_close(torch.cat([r0["codes"], r1["codes"]], dim=1), codes, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close((r0["loss"] + r1["loss"]) / 2, loss.detach(), atol=1e-6, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(r0["grads"][n], r1["grads"][n], msg=f"{n}: ranks disagree")
        torch.testing.assert_close(r0["grads"][n], p.grad, atol=1e-6, rtol=1e-4, msg=f"{n}: DDP gradient != single-process gradient")


# ---- DDP keeps each rank's queue
def _ddp_buffers_worker(rank, world, out_dir, keep_ignore_list):
    torch.manual_seed(rank)                       # different weights per rank: DDP must broadcast rank 0's
    model = tiny_swav_model()
    model.queue.configure(len(CROP_IDS), 8, 16)
    model.queue.push(torch.full((len(CROP_IDS), 4 + rank, 16), float(rank + 1)))   # each rank its own queue and fill level
    model.swav_iters.count.fill_(10 + rank)      # a buffer DDP does broadcast (broadcast_buffers=True)
    if not keep_ignore_list: model._ddp_params_and_buffers_to_ignore = []
    ddp = DDP(model)
    assert get_model(ddp) is model and isinstance(get_model(ddp).prototypes, nn.Linear)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)                 # each rank its own data
    for _ in range(2):                            # buffers are broadcast at the start of every forward
        crops = [torch.rand(4, 1, 16, 16) for _ in range(2)] + [torch.rand(4, 1, 8, 8) for _ in range(2)]
        _, scores = ddp(crops)
        codes = swav_codes(scores, 4, CROP_IDS, queue_scores=model.queue.scores(model.prototypes.weight))
        swav_loss(scores, codes, CROP_IDS).backward()
        opt.step(); opt.zero_grad()
    _save(out_dir, rank, queue=model.queue.embeddings.clone(), queue_len=int(model.queue.filled), swav_iters=int(model.swav_iters.count),
          params={n: p.detach().clone() for n, p in model.named_parameters()})

@pytest.mark.parametrize("keep_ignore_list", [True, False])
def test_ddp_keeps_per_rank_queue(tmp_path, keep_ignore_list):
    "Plain loop: DDP syncs parameters and broadcasts buffers from rank 0, but not the queue module's (`_ddp_params_and_buffers_to_ignore`)"
    r0, r1 = run_gloo(_ddp_buffers_worker, tmp_path, keep_ignore_list)
    for n in r0["params"]: torch.testing.assert_close(r0["params"][n], r1["params"][n], msg=f"{n} differs across ranks")
    assert r0["swav_iters"] == r1["swav_iters"] == 10         # broadcast_buffers is on: rank 0's value wins
    assert (r0["queue"][:, :4] == 1).all() and r0["queue_len"] == 4
    if keep_ignore_list: assert (r1["queue"][:, :5] == 2).all() and r1["queue_len"] == 5   # rank 1 kept its own
    else: assert (r1["queue"][:, :4] == 1).all() and r1["queue_len"] == 4                  # control: without the list DDP overwrites it


def _learner_ddp_worker(rank, world, out_dir, x, y):
    set_seed(rank)                                # each rank its own shuffling and crops
    dls = image_tensor_dls(x[rank::world], y[rank::world], bs=8, valid_pct=0.25, device="cpu")
    torch.manual_seed(0)
    model = tiny_swav_model()
    learn = Learner(dls, DDP(model), cbs=SWAV(tiny_pipelines(), CROP_IDS, K=12, queue_start_pct=0., freeze_protos_iters=1))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=1e-2)
    assert learn.swav.swav_model is model and learn.swav.swav_model.prototypes is model.prototypes
    _save(out_dir, rank, queue=model.queue.embeddings.clone(), queue_len=learn.swav.queue_filled, swav_iters=int(model.swav_iters),
          n_batches=len(dls.train), losses=[float(l) for l in learn.recorder.losses],
          params={n: p.detach().clone() for n, p in model.named_parameters()})

def test_fastai_learner_on_ddp_model(tmp_path):
    "A fastai Learner around a SwAVModel wrapped in DDP by hand (each rank its own shard of data): SWAV reaches the model through `get_model`"
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 16, 16), torch.randint(0, 10, (64,))
    r0, r1 = run_gloo(_learner_ddp_worker, tmp_path, x, y)
    for n in r0["params"]: torch.testing.assert_close(r0["params"][n], r1["params"][n], msg=f"{n} differs across ranks")
    for r in (r0, r1):
        assert r["swav_iters"] == r["n_batches"] == 3 and r["queue_len"] == 12
        assert all(math.isfinite(l) for l in r["losses"])
        torch.testing.assert_close(r["queue"].norm(dim=-1), torch.ones(len(CROP_IDS), 12))
    assert not torch.allclose(r0["queue"], r1["queue"])       # each rank queued its own embeddings


# ---- the benchmark script runs
def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_ddp_cpu", REPO / "bench" / "ddp_cpu.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

def test_bench_ddp_cpu_tiny(capsys):
    "bench/ddp_cpu.py --tiny, called in this process with forked 1-thread workers (spawn would import fastai again): it runs and prints figures"
    bench = _load_bench()
    results = bench.main(["--tiny", "--start-method", "fork", "--threads", "1", "--timeout", "60"])
    out = capsys.readouterr().out
    assert "step ms" in out and "max RSS" in out and "ratio" in out
    assert [r["nprocs"] for r in results] == [1, 1, 2, 2]
    for r in results: assert r["step_ms"] > 0 and r["max_rss_mib"] > 0 and math.isfinite(r["loss"])
