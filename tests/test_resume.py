"""Interrupting SwAV pretraining and resuming it: `learn.save`/`learn.load`, then `fit`/`fit_one_cycle(..., start_epoch=e)`.

`learn.save` stores the model (with the queue, `queue_len` and `swav_iters` buffers; under DDP also every rank's
queue, gathered into `rank_queues` at the end of each epoch) and the optimiser state. The crops (kornia: torch's
global RNG) and fastai's shuffling (each `DataLoader`'s own `random.Random`) depend on random states that `SWAV`
also keeps on the model (`rng_states`, every rank's, written at the end of each epoch) and restores when
`fit(..., start_epoch=e)` resumes after the epoch it was saved at, so a resumed run retraces the uninterrupted one
exactly; with `resume_rng=False` it continues from the same SwAV state with different crops.
"""
from __future__ import annotations
import math
import os
import random
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback  # noqa: F401  (patches Learner.no_bar)
from fastai.callback.schedule import fit_one_cycle    # noqa: F401  (patches Learner.fit_one_cycle)
from fastai.learner import CancelFitException, Learner
from fastai.torch_core import set_seed

from self_supervised_swav.data import digits_images, image_tensor_dls
from self_supervised_swav.swav import SWAV, create_swav_model, get_swav_aug_pipelines

CROP_IDS = [0, 1]
N_EPOCH = 2


def tiny_swav_model(n_protos: int = 10, projection_size: int = 16) -> nn.Module:
    "A SwAVModel around a 2-conv encoder, BatchNorm in encoder and projector (their running stats must resume too)"
    encoder = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return create_swav_model(encoder, hidden_size=32, projection_size=projection_size, n_protos=n_protos, bn=True)

def aug_pipelines():
    return get_swav_aug_pipelines(num_crops=[2, 2], crop_sizes=[16, 8], min_scales=[0.25, 0.05], max_scales=[1., 0.3],
                                  rotate=False, jitter=False, bw=False, blur=False, stats=None)

@pytest.fixture(scope="module")
def digits():
    x, y = digits_images(size=16)
    return x[:64], y[:64]

def make_learner(digits, path, model_seed=0, K=40, n_protos=10, projection_size=16, crop_ids=CROP_IDS, freeze=4, cbs=(), resume_rng=True):
    "48 training images in 3 batches of 16; over 2 epochs the queue (K=40) fills from the 2nd batch, is full after the 4th, in use from the 5th"
    set_seed(0, reproducible=True)                 # the same shuffling for every learner...
    dls = image_tensor_dls(*digits, bs=16, valid_pct=0.25, device="cpu")
    torch.manual_seed(model_seed)                  # ...and a model initialised from `model_seed`
    swav = SWAV(aug_pipelines(), crop_ids, K=K, queue_start_pct=0.1, freeze_protos_iters=freeze, resume_rng=resume_rng)
    return Learner(dls, tiny_swav_model(n_protos, projection_size), cbs=[swav, RawLosses(), *cbs], path=path)

def rng_state(learn) -> dict:
    "What the next batches' crops and shuffling depend on"
    return dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
                dls=[dl.rng.getstate() for dl in learn.dls.loaders])

def assert_same_rng(a: dict, b: dict):
    assert torch.equal(a["torch"], b["torch"]) and a["python"] == b["python"] and a["dls"] == b["dls"]
    assert a["numpy"][0] == b["numpy"][0] and np.array_equal(a["numpy"][1], b["numpy"][1]) and a["numpy"][2:] == b["numpy"][2:]

class Interrupt(Callback):
    "Stop fit at the start of epoch `epoch`, as a crash between epochs would; keep the RNG states of that moment"
    order = -20
    def __init__(self, epoch: int): self.stop_epoch, self.rng = epoch, None
    def before_epoch(self):
        if self.epoch == self.stop_epoch: self.rng = rng_state(self.learn); raise CancelFitException()

class RngAtEpoch(Callback):
    "The RNG states at the start of epoch `epoch`, after SWAV (order 9) has restored them"
    order = 10
    def __init__(self, epoch: int): self.at, self.rng = epoch, None
    def before_epoch(self):
        if self.epoch == self.at: self.rng = rng_state(self.learn)

class RawLosses(Callback):
    "The loss of every training batch (`recorder.losses` holds a smoothed loss, restarted at every fit)"
    def before_fit(self): self.losses = []
    def after_batch(self):
        if self.training: self.losses.append(self.learn.loss.item())

class FirstBatches(Callback):
    "Prototypes before and after each of the first training batches, and the queue the first batch sees"
    order = 20
    def before_fit(self): self.rows = []
    def before_batch(self):
        if self.training:
            if not self.rows: self.queue0, self.queue_len0 = self.swav.queue.clone(), self.swav.queue_len
            self.rows.append([self.swav.swav_model.prototypes.weight.detach().clone()])
    def after_batch(self):
        if self.training: self.rows[-1].append(self.swav.swav_model.prototypes.weight.detach().clone())

def _fit(learn, method, start_epoch=0):
    with learn.no_bar(), learn.no_logging():
        if method == "fit": learn.fit(N_EPOCH, lr=3e-3, start_epoch=start_epoch)
        else: learn.fit_one_cycle(N_EPOCH, lr_max=3e-3, start_epoch=start_epoch)


@pytest.mark.parametrize("method", ["fit", "fit_one_cycle"])
def test_resume_retraces_uninterrupted_run(digits, tmp_path, method):
    "Interrupted after epoch 1 with a half-full queue, saved, loaded into a new model and resumed: the same RNG states, losses and queue"
    full = make_learner(digits, tmp_path)
    _fit(full, method)
    n_iter = len(full.dls.train)

    stop = Interrupt(1)
    first = make_learner(digits, tmp_path, cbs=[stop])
    _fit(first, method)
    assert first.swav.queue_len == 32 and int(first.model.swav_iters) == n_iter   # the queue is half filled at the interruption
    first.save("ckpt")

    torch.manual_seed(123); random.seed(123); np.random.seed(123)         # the resumed process starts from other random states
    at1 = RngAtEpoch(1)
    resumed = make_learner(digits, tmp_path, model_seed=1, cbs=[at1]).load("ckpt")   # another initialisation: everything comes from the file
    _fit(resumed, method, start_epoch=1)
    assert_same_rng(at1.rng, stop.rng)

    assert first.raw_losses.losses == full.raw_losses.losses[:n_iter]
    torch.testing.assert_close(torch.tensor(resumed.raw_losses.losses), torch.tensor(full.raw_losses.losses[n_iter:]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(resumed.swav.queue, full.swav.queue, atol=1e-5, rtol=1e-5)
    assert resumed.swav.queue_len == full.swav.queue_len == 40
    assert int(resumed.model.swav_iters) == int(full.model.swav_iters) == N_EPOCH * n_iter
    for (n, p), q in zip(resumed.model.state_dict().items(), full.model.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=f"{n} differs")


def test_resume_keeps_swav_state(digits, tmp_path):
    "With resume_rng=False the crops differ, but the SwAV state carries over: queue, fill level, and the prototype-freezing counter"
    stop = Interrupt(1)
    first = make_learner(digits, tmp_path, cbs=[stop], resume_rng=False)   # freeze_protos_iters=4: frozen for 1 batch after the 3 of epoch 0
    _fit(first, "fit")
    first.save("ckpt")
    assert int(first.model.rng_epoch) == -1 and first.model.rng_states.numel() == 0   # nothing kept

    probe, at1 = FirstBatches(), RngAtEpoch(1)
    resumed = make_learner(digits, tmp_path, model_seed=1, cbs=[probe, at1], resume_rng=False).load("ckpt")
    _fit(resumed, "fit", start_epoch=1)
    torch.testing.assert_close(probe.queue0, first.swav.queue, atol=0, rtol=0)
    assert probe.queue_len0 == first.swav.queue_len == 32
    (before3, after3), (before4, after4) = probe.rows[:2]
    assert torch.equal(before3, after3), "iteration 3 < freeze_protos_iters=4: the prototypes must not move"
    assert not torch.equal(before4, after4), "iteration 4: the prototypes train"
    assert int(resumed.model.swav_iters) == N_EPOCH * len(resumed.dls.train) and resumed.swav.queue_len == 40
    assert all(math.isfinite(l) for l in resumed.recorder.losses)
    assert not torch.equal(at1.rng["torch"], stop.rng["torch"])


def test_resume_from_another_epoch_warns(digits, tmp_path):
    "The random state of the end of epoch 0 does not fit a resume at epoch 2: a warning, and training goes on"
    first = make_learner(digits, tmp_path, cbs=[Interrupt(1)])
    _fit(first, "fit")
    first.save("ckpt")
    resumed = make_learner(digits, tmp_path).load("ckpt")
    with pytest.warns(UserWarning, match="random state of the end of epoch 0 but fit resumes at epoch 2"):
        with resumed.no_bar(), resumed.no_logging(): resumed.fit(3, lr=3e-3, start_epoch=2)
    assert int(resumed.model.rng_epoch) == 2


def test_checkpoint_loads_without_pickle(digits, tmp_path):
    "The random state is plain int64 tensors: the checkpoint loads with torch.load(weights_only=True)"
    learn = make_learner(digits, tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=3e-3)
    learn.save("plain", with_opt=False)
    sd = torch.load(tmp_path / "models" / "plain.pth", weights_only=True)
    assert sd["rng_states"].dtype == torch.int64 and sd["rng_states"].shape[0] == 1 and int(sd["rng_epoch"]) == 0


# ---- checkpoints that do not fit the run
@pytest.fixture(scope="module")
def filled_ckpt(digits, tmp_path_factory):
    "A checkpoint whose queue (K=40, 2 assignment crops, 16-d embeddings) is full"
    tmp_path = tmp_path_factory.mktemp("filled")
    learn = make_learner(digits, tmp_path, K=40)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, lr=3e-3)
    assert learn.swav.queue_len == 40
    learn.save("filled")
    return tmp_path

@pytest.mark.parametrize("kwargs", [dict(K=32), dict(crop_ids=[0])], ids=["K", "crop_assgn_ids"])
def test_checkpoint_with_other_queue_shape(digits, filled_ckpt, kwargs):
    "A filled queue of another shape loads, then SWAV refuses to fit with a message naming reset_queue; after reset_queue it trains"
    learn = make_learner(digits, filled_ckpt, **kwargs).load("filled")
    with pytest.raises(ValueError, match=r"reset_queue\(\)") as e, learn.no_bar(), learn.no_logging(): learn.fit(1, lr=3e-3)
    assert "(2, 40, 16)" in str(e.value) and "K=" in str(e.value)
    assert learn.loss_func.__class__.__name__ == "CrossEntropyLossFlat"      # not left swapped
    learn.swav.reset_queue()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=3e-3)
    assert tuple(learn.swav.queue.shape) == (len(learn.swav.crop_assgn_ids), learn.swav.K, 16)

@pytest.mark.parametrize("kwargs", [dict(n_protos=12), dict(projection_size=8)], ids=["n_protos", "projection_size"])
def test_checkpoint_with_other_prototypes(digits, filled_ckpt, kwargs):
    "Another number of prototypes or embedding width: torch refuses to load, naming the prototypes"
    learn = make_learner(digits, filled_ckpt, **kwargs)
    with pytest.raises(RuntimeError, match=r"size mismatch for prototypes\.weight"): learn.load("filled")


# ---- resuming a 2-process run
def _entry(rank, fn, world, store, args):
    "One gloo process (same launcher as tests/test_distributed.py); RANK/WORLD_SIZE as torchrun sets them, for fastai"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try: fn(rank, world, *args)
    finally: dist.destroy_process_group()

def run_gloo(fn, tmp_path: Path, *args, world: int = 2, timeout: float = 90) -> list:
    ctx = mp.start_processes(_entry, args=(fn, world, str(tmp_path / "store"), (tmp_path, *args)), nprocs=world,
                             join=False, start_method=os.environ.get("SWAV_TEST_START_METHOD", "fork"))
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive(): p.kill()
            raise TimeoutError(f"{fn.__name__} did not finish in {timeout} s")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]

def _ddp_learner(rank, world, out_dir, x, y, model_seed, cbs=()):
    "Rank `rank`'s Learner: its own shard of the images, a SwAVModel wrapped in DDP by hand, K=12 per process"
    set_seed(rank)
    dls = image_tensor_dls(x[rank::world], y[rank::world], bs=8, valid_pct=0.25, device="cpu")
    torch.manual_seed(model_seed)
    swav = SWAV(aug_pipelines(), CROP_IDS, K=12, queue_start_pct=0., freeze_protos_iters=1)
    learn = Learner(dls, DDP(tiny_swav_model()), cbs=[swav, *cbs], path=out_dir)
    torch.manual_seed(1000 * model_seed + rank)   # the same initialisation on every rank, then each rank its own crops
    return learn

def _ddp_resume_worker(rank, world, out_dir, x, y, ckpt, reset):
    "Train 1 epoch and save (unless `ckpt` names a checkpoint already there), load it into a new learner, resume"
    own = own_rng = None
    if ckpt is None:
        learn = _ddp_learner(rank, world, out_dir, x, y, 0)
        with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=3e-3)
        own, own_rng, ckpt = learn.swav.queue.clone(), rng_state(learn)["torch"], "ddp"
        learn.save(ckpt)                          # fastai: rank 0 writes the file
    probe, at1 = FirstBatches(), RngAtEpoch(1)
    torch.manual_seed(100 + rank)
    resumed = _ddp_learner(rank, world, out_dir, x, y, 1, cbs=[probe, at1]).load(ckpt)
    if reset: resumed.swav.reset_queue()
    with warnings.catch_warnings(record=True) as warned, resumed.no_bar(), resumed.no_logging():
        warnings.simplefilter("always")
        resumed.fit(2, lr=3e-3, start_epoch=1)
    torch.save(dict(own=own, queue0=probe.queue0, queue_len0=probe.queue_len0, warnings=[str(w.message) for w in warned],
                    own_rng=own_rng, rng1=at1.rng["torch"]),
               out_dir / f"rank{rank}.pt")

def test_ddp_resume_gives_each_rank_its_queue(digits, tmp_path):
    "2 gloo processes resume from rank 0's learn.save: each rank continues with its own queue, fill level and random state, not rank 0's"
    r0, r1 = run_gloo(_ddp_resume_worker, tmp_path, *digits, None, False)
    assert not torch.equal(r0["own"], r1["own"]) and not torch.equal(r0["own_rng"], r1["own_rng"])
    for rank, r in enumerate((r0, r1)):
        assert torch.equal(r["queue0"], r["own"]), f"rank {rank} did not resume with its own queue"
        assert r["queue_len0"] == 12
        assert torch.equal(r["rng1"], r["own_rng"]), f"rank {rank} did not resume with its own random state"

def test_ddp_reset_queue_after_load(digits, tmp_path):
    "learn.swav.reset_queue() after learn.load in a 2-process run starts every rank with an empty queue"
    for r in run_gloo(_ddp_resume_worker, tmp_path, *digits, None, True): assert r["queue_len0"] == 0

def test_single_process_checkpoint_in_ddp_run(digits, tmp_path):
    "A filled queue from a 1-process checkpoint cannot be every rank's own: each rank warns and starts a new queue"
    set_seed(0)
    x, y = digits
    learn = Learner(image_tensor_dls(x, y, bs=8, valid_pct=0.25, device="cpu"), tiny_swav_model(), path=tmp_path,
                    cbs=SWAV(aug_pipelines(), CROP_IDS, K=12, queue_start_pct=0., freeze_protos_iters=1))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=3e-3)
    assert learn.swav.queue_len == 12
    learn.save("single")
    for r in run_gloo(_ddp_resume_worker, tmp_path, *digits, "single", False):
        assert r["queue_len0"] == 0
        assert any("emptied" in w for w in r["warnings"]), r["warnings"]
