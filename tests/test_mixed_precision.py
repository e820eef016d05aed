"""SWAV under mixed precision, on CPU: bf16 autocast, and optimiser steps skipped as a grad scaler skips them.

fastai's `MixedPrecision` (`learn.to_fp16()`, `learn.to_bf16()`) enters `autocast('cuda')`, which is disabled on a
CPU-only machine. `CPUAutocast` below does what `MixedPrecision` does, with `autocast('cpu')`: enter in
`before_batch`, cast the predictions to float in `after_pred`, exit in `after_loss`. So the SwAV loss, Sinkhorn
included, runs inside autocast, as it does on a GPU with fastai.
"""
from __future__ import annotations
import math

import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import ProgressCallback  # noqa: F401  (patches Learner.no_bar)
from fastai.learner import CancelStepException, Learner
from fastai.torch_core import set_seed, to_float

import self_supervised_swav.swav as swav
from self_supervised_swav.data import digits_images, image_tensor_dls
from self_supervised_swav.swav import SWAV, sinkhorn_knopp, swav_codes, swav_loss
import helpers
from helpers import tiny_pipelines

CROP_IDS = [0, 1]

class CPUAutocast(Callback):
    "fastai's `MixedPrecision` events, with `autocast('cpu')`: the forward pass and the loss run in `dtype`"
    order = MixedPrecision.order
    def __init__(self, dtype: torch.dtype = torch.bfloat16): self.dtype, self._ctx = dtype, None
    def before_batch(self):
        self._ctx = torch.autocast("cpu", dtype=self.dtype); self._ctx.__enter__()
    def after_pred(self): self.learn.pred = to_float(self.pred)
    def after_loss(self): self._exit()
    def after_cancel_batch(self): self._exit()
    def _exit(self):
        if self._ctx is not None: self._ctx.__exit__(None, None, None); self._ctx = None

class SkipSteps(Callback):
    "Cancel the optimiser step of the given training iterations, as `MixedPrecision` does when the grad scaler finds inf/NaN"
    order = MixedPrecision.order + 1            # after SWAV.before_step (9), where the grad scaler runs (10)
    def __init__(self, iters): self.iters = set(iters)
    def before_step(self):
        if self.train_iter in self.iters: raise CancelStepException()

class Probe(Callback):
    "Per training batch: assignment crops' embeddings, counters and weights before and after the batch"
    order = MixedPrecision.order + 2
    def before_fit(self): self.rows = []
    def before_batch(self):
        if self.training: self.rows.append(dict(protos0=self._protos(), enc0=self._enc()))
    def after_pred(self):
        if self.training:
            emb = self.pred[0].detach().float()
            self.rows[-1]["emb"] = emb.view(-1, emb.shape[0] // len(self.swav.augs), emb.shape[-1])[CROP_IDS].clone()
    def after_batch(self):
        if self.training:
            m = self.swav.swav_model
            self.rows[-1].update(protos1=self._protos(), enc1=self._enc(), swav_iters=int(m.swav_iters.count),
                                 host_iters=int(m.swav_iters), queue_len=self.swav.queue_filled)
    def _protos(self): return self.swav.swav_model.prototypes.weight.detach().clone()
    def _enc(self): return next(self.swav.swav_model.encoder.parameters()).detach().clone()


def tiny_swav_model(): return helpers.tiny_swav_model(bn=True)   # BatchNorm: its statistics run under autocast too


@pytest.fixture(scope="module")
def dls():
    "48 training images (3 batches of 16) and 16 validation images, 16 px"
    x, y = digits_images(size=16)
    return image_tensor_dls(x[:64], y[:64], bs=16, valid_pct=0.25, device="cpu")

aug_pipelines = tiny_pipelines

def scores_of(n: int, n_protos: int, dim: int = 32, seed: int = 0) -> torch.Tensor:
    "Cosine scores of `n` random unit embeddings against `n_protos` random unit prototypes"
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=1) @ F.normalize(torch.randn(n_protos, dim, generator=g), dim=1).T


# ---- training under bf16 autocast
@pytest.mark.parametrize("eps", [0.01, 0.05, 0.1])
def test_swav_trains_under_cpu_bf16_autocast(dls, monkeypatch, eps):
    "A few batches under autocast('cpu', bf16): the model computes in bf16, Sinkhorn gets float32 scores, nothing is inf/NaN (a bf16 loss used to break fastai's Recorder)"
    calls = []
    def spy(scores, *args, **kwargs):
        out = sinkhorn_knopp(scores, *args, **kwargs)
        calls.append(dict(dtype=scores.dtype, rows=scores.shape[-2], autocast=torch.is_autocast_enabled("cpu"),
                          out_dtype=out.dtype, finite=bool(torch.isfinite(out).all())))
        return out
    monkeypatch.setattr(swav, "sinkhorn_knopp", spy)
    set_seed(0)
    model = tiny_swav_model()
    proto_dtypes = []
    model.prototypes.register_forward_hook(lambda m, i, o: proto_dtypes.append(o.dtype))
    learn = Learner(dls, model, cbs=[SWAV(aug_pipelines(), CROP_IDS, K=16, queue_start_pct=0., eps=eps, freeze_protos_iters=1),
                                     CPUAutocast(torch.bfloat16)])
    with learn.no_bar(), learn.no_logging(): learn.fit(2, lr=1e-2)

    assert set(proto_dtypes) == {torch.bfloat16}                       # autocast was on: scores come out in bf16
    assert all(c["autocast"] and c["dtype"] == torch.float32 and c["out_dtype"] == torch.float32 and c["finite"] for c in calls)
    assert any(c["rows"] == 16 + 16 for c in calls)                    # the queue (16) entered Sinkhorn with the batch (16)
    assert all(math.isfinite(float(l)) for l in learn.recorder.losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    queue = learn.swav.queue
    assert queue.dtype == torch.float32 and torch.isfinite(queue).all()
    torch.testing.assert_close(queue.norm(dim=-1), torch.ones(2, 16), atol=2e-2, rtol=0)   # unit norm, to bf16 precision
    assert learn.loss_func.__class__.__name__ == "CrossEntropyLossFlat"   # restored after fit


# ---- the pure functions under autocast
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [0.01, 0.05, 0.1])
def test_sinkhorn_finite_under_autocast(dtype, eps):
    "Sinkhorn on low-precision scores, inside autocast: float32 codes, finite, rows sum to 1. At the paper's size (K=3000, 4096 rows) fp16 iterations would underflow to NaN"
    for n, k in ((256, 300), (4096, 3000)):
        scores = scores_of(n, k)
        with torch.autocast("cpu", dtype=dtype):
            codes = sinkhorn_knopp(scores.to(dtype), eps=eps)
        assert codes.dtype == torch.float32 and torch.isfinite(codes).all() and (codes >= 0).all()
        torch.testing.assert_close(codes.sum(1), torch.ones(n), atol=1e-5, rtol=0)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_sinkhorn_under_autocast_matches_float32(dtype, eps):
    "Autocast must not change Sinkhorn: the same float32 scores give the same codes inside and outside autocast"
    for n, k in ((256, 300), (4096, 3000)):
        scores = scores_of(n, k)
        ref = sinkhorn_knopp(scores, eps=eps)
        with torch.autocast("cpu", dtype=dtype): codes = sinkhorn_knopp(scores, eps=eps)
        torch.testing.assert_close(codes, ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(codes.sum(1), torch.ones(n), atol=1e-5, rtol=0)

def test_swav_loss_under_autocast_is_float32():
    "The loss and its gradient are float32 and the same inside autocast: log-softmax and cross-entropy in float32"
    n_crops, bs, k = 8, 16, 30
    scores = scores_of(n_crops * bs, k)
    codes = swav_codes(scores, bs, CROP_IDS)
    s_ref = scores.clone().requires_grad_(); ref = swav_loss(s_ref, codes, CROP_IDS); ref.backward()
    s = scores.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16): loss = swav_loss(s, codes, CROP_IDS)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s.grad, s_ref.grad, atol=1e-7, rtol=1e-5)


# ---- counters and queue: once per training batch, skipped steps included
@pytest.mark.parametrize("autocast", [False, True])
def test_counters_and_queue_advance_once_per_batch(dls, autocast):
    "Prototype-freezing counter and queue move once per training batch, also when the step is cancelled; validation moves neither"
    set_seed(0)
    K, freeze, skipped = 40, 3, {1, 4}
    probe = Probe()
    cbs = [SWAV(aug_pipelines(), CROP_IDS, K=K, queue_start_pct=0., freeze_protos_iters=freeze), SkipSteps(skipped), probe]
    learn = Learner(dls, tiny_swav_model(), cbs=cbs + ([CPUAutocast(torch.bfloat16)] if autocast else []))
    with learn.no_bar(), learn.no_logging(): learn.fit(2, lr=1e-2)

    rows = probe.rows
    assert len(rows) == 2 * len(dls.train) == 6
    for i, r in enumerate(rows):
        assert r["swav_iters"] == r["host_iters"] == i + 1
        assert r["queue_len"] == min(K, 16 * (i + 1))
        protos_moved, enc_moved = not torch.equal(r["protos0"], r["protos1"]), not torch.equal(r["enc0"], r["enc1"])
        assert enc_moved == (i not in skipped), f"batch {i}: encoder moved={enc_moved}"
        assert protos_moved == (i not in skipped and i >= freeze), f"batch {i}: prototypes moved={protos_moved}"
    expected = torch.cat([r["emb"] for r in reversed(rows)], dim=1)[:, :K]   # newest first, each batch once
    torch.testing.assert_close(learn.swav.queue, expected, atol=0, rtol=0)
    assert int(learn.model.swav_iters) == 6 and int(learn.model.queue.filled) == learn.swav.queue_filled == K


# ---- fastai's own MixedPrecision callback
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("mode", ["to_fp16", "to_bf16"])
def test_fastai_mixed_precision_callback(mode):
    "SWAV (order 9) with fastai's MixedPrecision (order 10). On CPU its autocast('cuda') is disabled: this checks the wiring; on a GPU, the real thing"
    x, y = digits_images(size=16)
    dls = image_tensor_dls(x[:64], y[:64], bs=16, valid_pct=0.25)          # fastai's default device: a GPU if there is one
    set_seed(0)
    learn = getattr(Learner(dls, tiny_swav_model(), cbs=SWAV(aug_pipelines(), CROP_IDS, K=16, queue_start_pct=0., freeze_protos_iters=1)), mode)()
    assert [type(c).__name__ for c in learn.cbs].index("SWAV") < [type(c).__name__ for c in learn.cbs].index("MixedPrecision")
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=1e-2)
    assert int(learn.model.swav_iters) == int(learn.model.swav_iters.count) == len(dls.train)   # skipped fp16 steps count too
    assert learn.swav.queue_filled == 16 and torch.isfinite(learn.swav.queue).all()
    assert all(math.isfinite(float(l)) for l in learn.recorder.losses)
