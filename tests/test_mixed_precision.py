"""SWAV under mixed precision, on CPU: bf16 autocast (`precision.DeviceMixedPrecision`, what `learn.to_bf16()` adds), and
optimiser steps skipped as a grad scaler skips them.

fastai's `MixedPrecision` enters `autocast('cuda')`, which is disabled on a CPU-only machine; the library's
`DeviceMixedPrecision` (a subclass) enters the autocast of the learner's device: enter in `before_batch`, cast the
predictions to float in `after_pred`, exit in `after_loss`. So the SwAV loss, Sinkhorn included, runs inside autocast,
as it does on a GPU with fastai. Against float32 (same seeds, same crops) six bf16 steps give losses within 1 %,
codes within 0.01 on average (the same argmax for >= 90 % of the rows), BatchNorm statistics within 2 %; a resumed bf16 run ends on the
uninterrupted run's weights to the bit.
"""
from __future__ import annotations
import json
import math
import signal

import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import ProgressCallback  # noqa: F401  (patches Learner.no_bar)
from fastai.learner import CancelStepException, Learner
from fastai.torch_core import set_seed

import self_supervised_swav.swav as swav
from self_supervised_swav.checkpoint import Interrupted
from self_supervised_swav.checks import SettingError
from self_supervised_swav.cli import main
from self_supervised_swav.data import digits_images, image_tensor_dls
from self_supervised_swav.precision import DeviceMixedPrecision, cpu_bf16_supported, learner_device
from self_supervised_swav.swav import SWAV, sinkhorn_knopp, swav_codes, swav_loss
import helpers
from helpers import assert_same_run, resnet_swav_model, run_main, tiny_pipelines

CROP_IDS = [0, 1]

def cpu_bf16(): return DeviceMixedPrecision(amp_mode="bf16")

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
    learn = Learner(dls, model, cbs=[SWAV(aug_pipelines(), CROP_IDS, K=16, queue_start_pct=0., eps=eps, freeze_protos_iters=1)]).to_bf16()
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
    learn = Learner(dls, tiny_swav_model(), cbs=cbs + ([cpu_bf16()] if autocast else []))
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


# ---- learn.to_fp16() / learn.to_bf16(): the learner's device
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("mode", ["to_fp16", "to_bf16"])
def test_to_fp16_and_to_bf16_on_the_learners_device(mode):
    "SWAV (order 9) before the mixed-precision callback (order 10, a fastai `MixedPrecision`). bf16 trains on either device; fp16 on a GPU, and on a CPU it is one `SettingError` on fp16"
    x, y = digits_images(size=16)
    dls = image_tensor_dls(x[:64], y[:64], bs=16, valid_pct=0.25)          # fastai's default device: a GPU if there is one
    set_seed(0)
    learn = getattr(Learner(dls, tiny_swav_model(), cbs=SWAV(aug_pipelines(), CROP_IDS, K=16, queue_start_pct=0., freeze_protos_iters=1)), mode)()
    names = [type(c).__name__ for c in learn.cbs]
    assert names.index("SWAV") < names.index("DeviceMixedPrecision") and isinstance(learn.cbs[-1], MixedPrecision)
    if mode == "to_fp16" and learner_device(learn).type == "cpu":
        with learn.no_bar(), learn.no_logging(), pytest.raises(SettingError, match="fp16 needs a CUDA GPU") as e: learn.fit(1, lr=1e-2)
        assert e.value.param == "fp16" and not torch.is_autocast_enabled("cpu")
        return
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=1e-2)
    assert int(learn.model.swav_iters) == int(learn.model.swav_iters.count) == len(dls.train)   # skipped fp16 steps count too
    assert learn.swav.queue_filled == 16 and torch.isfinite(learn.swav.queue).all()
    assert all(math.isfinite(float(l)) for l in learn.recorder.losses)
    assert type(learn.to_fp32().cbs[-1]).__name__ != "DeviceMixedPrecision"


# ---- bf16 against float32: the same crops, a few steps
class Record(Callback):
    "Per training batch: the loss and the codes (`swav_codes`'s result, spied on in the `swav` module)"
    order = 20
    def __init__(self, monkeypatch):
        def spy(*args, **kwargs):
            codes = swav_codes(*args, **kwargs)
            if self.training: self.codes.append(codes.detach().clone())
            return codes
        monkeypatch.setattr(swav, "swav_codes", spy)
    def before_fit(self): self.losses, self.codes = [], []
    def after_loss(self):
        if self.training: self.losses.append(float(self.loss.detach()))

def fit_digits(monkeypatch, bf16: bool, epochs: int = 2):
    "A BatchNorm tiny SwAV model, a queue from the second batch, 2 epochs of 3 batches, with or without bf16 autocast; the same batches and crops each call"
    set_seed(0)
    x, y = digits_images(size=16)
    dls = image_tensor_dls(x[:64], y[:64], bs=16, valid_pct=0.25, device="cpu")   # made after the seed: its shuffling too
    rec = Record(monkeypatch)
    learn = Learner(dls, tiny_swav_model(), cbs=[SWAV(aug_pipelines(), CROP_IDS, K=16, queue_start_pct=0.2, freeze_protos_iters=1), rec])
    if bf16: learn.to_bf16()
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, lr=1e-3)
    return learn, rec

def rel(a: torch.Tensor, b: torch.Tensor) -> float: return float((a - b).detach().norm() / b.detach().norm())

def test_bf16_close_to_float32(monkeypatch):
    "6 steps (Adam, lr 1e-3), the same crops: bf16 losses within 1 % of float32's; codes (float32) within 0.01 on average, the same argmax for >= 90 % of the rows; BatchNorm statistics float32 and within 2 %; weights within 5 %; nothing NaN"
    ref, ref_rec = fit_digits(monkeypatch, bf16=False)
    learn, rec = fit_digits(monkeypatch, bf16=True)
    assert len(rec.losses) == len(rec.codes) == 6 and all(math.isfinite(l) for l in rec.losses)
    torch.testing.assert_close(torch.tensor(rec.losses), torch.tensor(ref_rec.losses), rtol=1e-2, atol=0)
    for c, c_ref in zip(rec.codes, ref_rec.codes):
        assert c.dtype == torch.float32 and torch.isfinite(c).all()
        assert (c - c_ref).abs().mean() < 1e-2 and (c.argmax(-1) == c_ref.argmax(-1)).float().mean() >= 0.9
    bns = [(m, r) for m, r in zip(learn.model.modules(), ref.model.modules()) if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)]
    assert len(bns) == 2
    for bn, bn_ref in bns:
        assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32
        assert rel(bn.running_mean, bn_ref.running_mean) < 2e-2 and rel(bn.running_var, bn_ref.running_var) < 2e-2
    for p, p_ref in zip(learn.model.parameters(), ref.model.parameters()):
        assert p.dtype == torch.float32 and torch.isfinite(p).all() and rel(p, p_ref) < 0.1   # Adam's normalised steps: < 5 % on an Intel Xeon (AMX), 6.1 % with emulated bf16 (AMD EPYC)
    assert not torch.is_autocast_enabled("cpu")


# ---- the torch bug: a strided convolution on 1x1 maps
def test_bf16_refuses_crops_giving_1x1_maps(dls):
    "resnet10t on 16 + 8 px crops: its last stage gets 1x1 maps, where torch's CPU bf16 backward is wrong; the fit stops at the first batch, naming 17 px"
    x, y = digits_images(size=16)
    model = resnet_swav_model().train()
    before = [p.detach().clone() for p in model.encoder.parameters()]
    learn = Learner(dls, model, cbs=SWAV(aug_pipelines(), CROP_IDS, K=None, freeze_protos_iters=0)).to_bf16()
    with learn.no_bar(), learn.no_logging(), pytest.raises(SettingError, match="pass crop sizes >= 17 px") as e: learn.fit(1, lr=1e-2)
    assert e.value.param == "bf16" and "layer3.0.conv1" in str(e.value) and "8, 16 px crops" in str(e.value)
    assert all(torch.equal(p, p0) for p, p0 in zip(model.encoder.parameters(), before))   # no step was taken
    assert not torch.is_autocast_enabled("cpu")

def test_cli_bf16_small_crops_is_one_line(tmp_path):
    "swav_pretrain --bf16 with crops that give 1x1 maps: exit 2, one line naming --bf16 and the smallest crop size, no run folder"
    code, err = run_main(main, "--max_images", 100, "--size", 16, "--crop_sizes", 16, 8, "--bf16", "--output", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and err.startswith("swav_pretrain: error: --bf16 on CPU") and "pass crop sizes >= 17 px" in err, err
    assert not (tmp_path / "out").exists()


# ---- resume: exact in bf16
RUN = ["--max_images", 200, "--size", 20, "--crop_sizes", 20, 17, "--bs", 40, "--n_protos", 10, "--epochs", 3, "--K", 80,
       "--queue_start_pct", 0.3, "--bf16"]   # 4 batches an epoch; 17 px: resnet10t's smallest bf16 crop

@pytest.mark.skipif(not (torch.cuda.is_available() or cpu_bf16_supported()),
                    reason="no bfloat16 instructions on this CPU: swav_pretrain refuses --bf16 (emulated, tens of times slower)")
def test_resumed_bf16_run_equals_uninterrupted(tmp_path):
    "swav_pretrain --bf16 stopped after epoch 1 of 3 and resumed ends with the uninterrupted run's weights and figures, to the bit"
    full, out = tmp_path / "full", tmp_path / "run"
    code, err = run_main(main, *RUN, "--output", full)
    assert code == 0, err
    with helpers.on_checkpoint(1, Interrupted(signal.SIGTERM)): code, err = run_main(main, *RUN, "--output", out)
    assert code == 128 + signal.SIGTERM, err
    code, err = run_main(main, "--resume", out)
    assert code == 0, err
    assert_same_run(out, full)
    assert json.loads((full / "settings.json").read_text())["bf16"] is True
