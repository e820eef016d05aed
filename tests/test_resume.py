"""Interrupting SwAV pretraining and resuming it: `learn.save`/`learn.load`, then `fit`/`fit_one_cycle(..., start_epoch=e)`.

`learn.save` stores the model (with its state modules: the queue, `model.queue`, under DDP with every rank's queue
gathered at the end of each epoch, and the iteration count, `model.swav_iters`) and the optimiser state. The crops
(kornia: torch's global RNG) and fastai's shuffling (each `DataLoader`'s own `random.Random`) depend on random states
that the `ResumeRandomState` callback added by `SWAV` also keeps on the model (`model.random_state`, every rank's,
written at the end of each epoch) and restores when
`fit(..., start_epoch=e)` resumes after the epoch it was saved at, so a resumed run retraces the uninterrupted one
exactly; with `resume_rng=False` it continues from the same SwAV state with different crops.
"""
from __future__ import annotations
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback  # noqa: F401  (patches Learner.no_bar)
from fastai.callback.schedule import fit_one_cycle    # noqa: F401  (patches Learner.fit_one_cycle)
from fastai.learner import Learner
from fastai.torch_core import set_seed

from self_supervised_swav.data import digits_images, image_tensor_dls
from self_supervised_swav.swav import SWAV, create_swav_model
import helpers
from harness import run_gloo, save_result
from helpers import Interrupt, KeepAt, tiny_pipelines

CROP_IDS = [0, 1]
N_EPOCH = 2


def tiny_swav_model(n_protos: int = 10, projection_size: int = 16) -> nn.Module:
    "BatchNorm in encoder and projector: their running statistics must resume too"
    return helpers.tiny_swav_model(n_protos, projection_size, bn=True)

aug_pipelines = tiny_pipelines

def make_learner(digits64, path, model_seed=0, K=40, n_protos=10, projection_size=16, crop_ids=CROP_IDS, freeze=4, cbs=(), resume_rng=True,
                 hand_made=False):
    "48 training images in 3 batches of 16; over 2 epochs the queue (K=40) fills from the 2nd batch, is full after the 4th, in use from the 5th"
    set_seed(0, reproducible=True)                 # the same shuffling for every learner...
    dls = image_tensor_dls(*digits64, bs=16, valid_pct=0.25, device="cpu")
    torch.manual_seed(model_seed)                  # ...and a model initialised from `model_seed`
    swav = SWAV(aug_pipelines(), crop_ids, K=K, queue_start_pct=0.1, freeze_protos_iters=freeze, resume_rng=resume_rng)
    model = helpers.HandMadeSwAV(n_protos, projection_size, bn=True) if hand_made else tiny_swav_model(n_protos, projection_size)
    return Learner(dls, model, cbs=[swav, RawLosses(), *cbs], path=path)

def rng_state(learn) -> dict:
    "What the next batches' crops and shuffling depend on"
    return dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
                dls=[dl.rng.getstate() for dl in learn.dls.loaders])

def assert_same_rng(a: dict, b: dict):
    assert torch.equal(a["torch"], b["torch"]) and a["python"] == b["python"] and a["dls"] == b["dls"]
    assert a["numpy"][0] == b["numpy"][0] and np.array_equal(a["numpy"][1], b["numpy"][1]) and a["numpy"][2:] == b["numpy"][2:]


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
            if not self.rows: self.queue0, self.queue_len0 = self.swav.queue.clone(), self.swav.queue_filled
            self.rows.append([self.swav.swav_model.prototypes.weight.detach().clone()])
    def after_batch(self):
        if self.training: self.rows[-1].append(self.swav.swav_model.prototypes.weight.detach().clone())

def _fit(learn, method, start_epoch=0):
    with learn.no_bar(), learn.no_logging():
        if method == "fit": learn.fit(N_EPOCH, lr=3e-3, start_epoch=start_epoch)
        else: learn.fit_one_cycle(N_EPOCH, lr_max=3e-3, start_epoch=start_epoch)


@pytest.mark.parametrize("method,K,hand_made", [("fit", 40, False), ("fit_one_cycle", 40, False), ("fit", 40, True), ("fit", None, True)],
                         ids=["fit", "fit_one_cycle", "hand-made-model", "hand-made-model-no-queue"])
def test_resume_retraces_uninterrupted_run(digits64, tmp_path, method, K, hand_made):
    """Interrupted after epoch 1 with a half-full queue, saved, loaded into a new model and resumed: the same RNG states, losses and queue.
    A hand-made model (not a SwAVModel) gets the same state modules from SWAV and resumes exactly too, with and without a queue."""
    full = make_learner(digits64, tmp_path, K=K, hand_made=hand_made)
    _fit(full, method)
    n_iter = len(full.dls.train)

    stop = Interrupt(1, keep=rng_state)
    first = make_learner(digits64, tmp_path, K=K, hand_made=hand_made, cbs=[stop])
    _fit(first, method)
    assert first.swav.queue_filled == (32 if K else 0) and int(first.model.swav_iters) == n_iter   # the queue is half filled at the interruption
    first.save("ckpt")

    torch.manual_seed(123); random.seed(123); np.random.seed(123)         # the resumed process starts from other random states
    at1 = KeepAt(1, keep=rng_state)
    resumed = make_learner(digits64, tmp_path, K=K, hand_made=hand_made, model_seed=1, cbs=[at1]).load("ckpt")   # everything comes from the file
    _fit(resumed, method, start_epoch=1)
    assert_same_rng(at1.kept, stop.kept)

    assert first.raw_losses.losses == full.raw_losses.losses[:n_iter]
    torch.testing.assert_close(torch.tensor(resumed.raw_losses.losses), torch.tensor(full.raw_losses.losses[n_iter:]), atol=1e-5, rtol=1e-5)
    if K: torch.testing.assert_close(resumed.swav.queue, full.swav.queue, atol=1e-5, rtol=1e-5)
    assert resumed.swav.queue_filled == full.swav.queue_filled == (40 if K else 0)
    assert int(resumed.model.swav_iters) == int(full.model.swav_iters) == N_EPOCH * n_iter
    for (n, p), q in zip(resumed.model.state_dict().items(), full.model.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=f"{n} differs")


def test_resume_keeps_swav_state(digits64, tmp_path):
    "With resume_rng=False the crops differ, but the SwAV state carries over: queue, fill level, and the prototype-freezing counter"
    stop = Interrupt(1, keep=rng_state)
    first = make_learner(digits64, tmp_path, cbs=[stop], resume_rng=False)   # freeze_protos_iters=4: frozen for 1 batch after the 3 of epoch 0
    _fit(first, "fit")
    first.save("ckpt")
    assert first.model.random_state.saved_epoch == -1 and first.model.random_state.states.numel() == 0   # nothing kept

    probe, at1 = FirstBatches(), KeepAt(1, keep=rng_state)
    resumed = make_learner(digits64, tmp_path, model_seed=1, cbs=[probe, at1], resume_rng=False).load("ckpt")
    _fit(resumed, "fit", start_epoch=1)
    torch.testing.assert_close(probe.queue0, first.swav.queue, atol=0, rtol=0)
    assert probe.queue_len0 == first.swav.queue_filled == 32
    (before3, after3), (before4, after4) = probe.rows[:2]
    assert torch.equal(before3, after3), "iteration 3 < freeze_protos_iters=4: the prototypes must not move"
    assert not torch.equal(before4, after4), "iteration 4: the prototypes train"
    assert int(resumed.model.swav_iters) == N_EPOCH * len(resumed.dls.train) and resumed.swav.queue_filled == 40
    assert all(math.isfinite(l) for l in resumed.recorder.losses)
    assert not torch.equal(at1.kept["torch"], stop.kept["torch"])


def test_resume_from_another_epoch_warns(digits64, tmp_path):
    "The random state of the end of epoch 0 does not fit a resume at epoch 2: a warning, and training goes on"
    first = make_learner(digits64, tmp_path, cbs=[Interrupt(1, keep=rng_state)])
    _fit(first, "fit")
    first.save("ckpt")
    resumed = make_learner(digits64, tmp_path).load("ckpt")
    with pytest.warns(UserWarning, match="random state of the end of epoch 0 but fit resumes at epoch 2"):
        with resumed.no_bar(), resumed.no_logging(): resumed.fit(3, lr=3e-3, start_epoch=2)
    assert resumed.model.random_state.saved_epoch == 2


def test_checkpoint_loads_without_pickle(digits64, tmp_path):
    "The random state is plain int64 tensors: the checkpoint loads with torch.load(weights_only=True)"
    learn = make_learner(digits64, tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=3e-3)
    learn.save("plain", with_opt=False)
    sd = torch.load(tmp_path / "models" / "plain.pth", weights_only=True)
    assert sd["random_state.states"].dtype == torch.int64 and sd["random_state.states"].shape[0] == 1
    assert int(sd["random_state.epoch"]) == 0


def test_checkpoint_of_version_0_1_0_loads(tmp_path):
    """A checkpoint written by release 0.1.0 (queue, counters and random state as loose buffers of the model), made with:
    digits at 16 px, 48 training images, bs 16; encoder Conv2d(1, 4, 3, stride 2, padding 1)-BatchNorm2d-ReLU-pool, hidden 8,
    projection 8, 6 prototypes; crops 2x16 + 2x8 px; SWAV(K=24, queue_start_pct=0.1, freeze_protos_iters=2); fit(2, 1e-3);
    learn.save(with_opt=True). `checkpoint_v0_1_0_expected.pth` holds its queue and counters as that release read them."""
    data = Path(__file__).parent / "data"
    expected = torch.load(data / "checkpoint_v0_1_0_expected.pth", weights_only=True)
    x, y = digits_images(size=16)
    set_seed(0, reproducible=True)
    dls = image_tensor_dls(x[:64], y[:64], bs=16, valid_pct=0.25, device="cpu")
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = create_swav_model(encoder, hidden_size=8, projection_size=8, n_protos=6)
    learn = Learner(dls, model, cbs=SWAV(aug_pipelines(), CROP_IDS, K=24, queue_start_pct=0.1, freeze_protos_iters=2), path=tmp_path)
    learn.load(str(data / "checkpoint_v0_1_0"))
    assert torch.equal(learn.swav.queue, expected["queue"]) and learn.swav.queue_filled == expected["queue_len"] == 24
    assert int(learn.model.swav_iters) == expected["swav_iters"] == 6
    assert learn.model.random_state.saved_epoch == expected["rng_epoch"] == 1
    assert torch.equal(learn.model.random_state.states, expected["rng_states"])
    with learn.no_bar(), learn.no_logging(): learn.fit(3, lr=1e-3, start_epoch=2)   # and the run continues from it
    assert int(learn.model.swav_iters) == 9 and learn.model.random_state.saved_epoch == 2


# ---- checkpoints that do not fit the run
@pytest.fixture(scope="module")
def filled_ckpt(digits64, tmp_path_factory):
    "A checkpoint whose queue (K=40, 2 assignment crops, 16-d embeddings) is full"
    tmp_path = tmp_path_factory.mktemp("filled")
    learn = make_learner(digits64, tmp_path, K=40)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, lr=3e-3)
    assert learn.swav.queue_filled == 40
    learn.save("filled")
    return tmp_path

@pytest.mark.parametrize("kwargs", [dict(K=32), dict(crop_ids=[0])], ids=["K", "crop_assgn_ids"])
def test_checkpoint_with_other_queue_shape(digits64, filled_ckpt, kwargs):
    "A filled queue of another shape loads, then SWAV refuses to fit with a message naming reset_queue; after reset_queue it trains"
    learn = make_learner(digits64, filled_ckpt, **kwargs).load("filled")
    with pytest.raises(ValueError, match=r"reset_queue\(\)") as e, learn.no_bar(), learn.no_logging(): learn.fit(1, lr=3e-3)
    assert "(2, 40, 16)" in str(e.value) and "K=" in str(e.value)
    assert learn.loss_func.__class__.__name__ == "CrossEntropyLossFlat"      # not left swapped
    learn.swav.reset_queue()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=3e-3)
    assert tuple(learn.swav.queue.shape) == (len(learn.swav.crop_assgn_ids), learn.swav.K, 16)

@pytest.mark.parametrize("kwargs", [dict(n_protos=12), dict(projection_size=8)], ids=["n_protos", "projection_size"])
def test_checkpoint_with_other_prototypes(digits64, filled_ckpt, kwargs):
    "Another number of prototypes or embedding width: torch refuses to load, naming the prototypes"
    learn = make_learner(digits64, filled_ckpt, **kwargs)
    with pytest.raises(RuntimeError, match=r"size mismatch for prototypes\.weight"): learn.load("filled")


# ---- resuming a 2-process run
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
    probe, at1 = FirstBatches(), KeepAt(1, keep=rng_state)
    torch.manual_seed(100 + rank)
    resumed = _ddp_learner(rank, world, out_dir, x, y, 1, cbs=[probe, at1]).load(ckpt)
    if reset: resumed.swav.reset_queue()
    with warnings.catch_warnings(record=True) as warned, resumed.no_bar(), resumed.no_logging():
        warnings.simplefilter("always")
        resumed.fit(2, lr=3e-3, start_epoch=1)
    save_result(out_dir, rank, own=own, queue0=probe.queue0, queue_len0=probe.queue_len0, warnings=[str(w.message) for w in warned],
                own_rng=own_rng, rng1=at1.kept["torch"])

def test_ddp_resume_gives_each_rank_its_queue(digits64, tmp_path):
    "2 gloo processes resume from rank 0's learn.save: each rank continues with its own queue, fill level and random state, not rank 0's"
    r0, r1 = run_gloo(_ddp_resume_worker, tmp_path, *digits64, None, False)
    assert not torch.equal(r0["own"], r1["own"]) and not torch.equal(r0["own_rng"], r1["own_rng"])
    for rank, r in enumerate((r0, r1)):
        assert torch.equal(r["queue0"], r["own"]), f"rank {rank} did not resume with its own queue"
        assert r["queue_len0"] == 12
        assert torch.equal(r["rng1"], r["own_rng"]), f"rank {rank} did not resume with its own random state"

def test_ddp_reset_queue_after_load(digits64, tmp_path):
    "learn.swav.reset_queue() after learn.load in a 2-process run starts every rank with an empty queue"
    for r in run_gloo(_ddp_resume_worker, tmp_path, *digits64, None, True): assert r["queue_len0"] == 0

def test_single_process_checkpoint_in_ddp_run(digits64, tmp_path):
    "A filled queue from a 1-process checkpoint cannot be every rank's own: each rank warns and starts a new queue"
    set_seed(0)
    x, y = digits64
    learn = Learner(image_tensor_dls(x, y, bs=8, valid_pct=0.25, device="cpu"), tiny_swav_model(), path=tmp_path,
                    cbs=SWAV(aug_pipelines(), CROP_IDS, K=12, queue_start_pct=0., freeze_protos_iters=1))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=3e-3)
    assert learn.swav.queue_filled == 12
    learn.save("single")
    for r in run_gloo(_ddp_resume_worker, tmp_path, *digits64, "single", False):
        assert r["queue_len0"] == 0
        assert any("emptied" in w for w in r["warnings"]), r["warnings"]
