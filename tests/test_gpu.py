"""What only a CUDA GPU can check (marked `gpu`; skipped without one): fp16 with fastai's gradient scaler, the CUDA
random state kept in checkpoints, SyncBatchNorm and NCCL, Sinkhorn under CUDA autocast.

`make gpu-check` (`bench/gpu_check.py`) runs them with `pytest -m gpu tests/test_gpu.py` on a GPU machine; on a
CPU-only machine every test here is skipped. They are small (digits at 16 px, a tiny model): seconds on a GPU.
"""
from __future__ import annotations
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision  # noqa: F401  (patches Learner.to_fp16)
from fastai.callback.progress import ProgressCallback  # noqa: F401  (patches Learner.no_bar)
from fastai.learner import Learner
from fastai.torch_core import set_seed

from self_supervised_swav.data import image_tensor_dls
from self_supervised_swav.swav import SWAV, sinkhorn_knopp, swav_codes
import helpers
from helpers import official_sinkhorn, tiny_pipelines

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CROP_IDS = [0, 1]


def cuda_learner(digits64, path, model_seed=0, K=40, cbs=()) -> Learner:
    "48 training images in 3 batches of 16 on the GPU, a tiny BatchNorm SwAV model, a queue of 40"
    set_seed(0, reproducible=True)
    dls = image_tensor_dls(*digits64, bs=16, valid_pct=0.25, device="cuda")
    torch.manual_seed(model_seed)
    swav = SWAV(tiny_pipelines(), CROP_IDS, K=K, queue_start_pct=0.1, freeze_protos_iters=2)
    return Learner(dls, helpers.tiny_swav_model(bn=True).cuda(), cbs=[swav, LossLog(), *cbs], path=path)


class LossLog(Callback):
    "Training losses, the dtype of the scores the model returns (before `MixedPrecision` casts them), the scaler's state per batch"
    order = MixedPrecision.order - 0.5
    def before_fit(self): self.losses, self.score_dtypes, self.scales = [], set(), []
    def after_pred(self):
        if self.training: self.score_dtypes.add(self.learn.pred[1].dtype)
    def after_loss(self):
        if self.training: self.losses.append(self.learn.loss.item())
    def after_batch(self):
        scaler = getattr(self.learn, "scaler", None)
        if self.training and scaler is not None: self.scales.append((scaler.is_enabled(), scaler.get_scale()))


def cuda_rng(learn) -> torch.Tensor: return torch.cuda.get_rng_state()


def fit(learn, n_epoch=2, start_epoch=0):
    with learn.no_bar(), learn.no_logging(): learn.fit(n_epoch, lr=3e-3, start_epoch=start_epoch)


def test_fp16_with_grad_scaler(digits64, tmp_path):
    "learn.to_fp16(): the scores come out in float16, the loss is finite, the scaler is on, and skipped steps still count"
    learn = cuda_learner(digits64, tmp_path).to_fp16()
    before = [p.detach().clone() for p in learn.model.parameters()]
    fit(learn)
    log = learn.loss_log
    assert log.score_dtypes == {torch.float16}
    assert all(np.isfinite(log.losses)) and len(log.losses) == 2 * len(learn.dls.train)
    assert len(log.scales) == len(log.losses) and all(on and scale > 0 for on, scale in log.scales)
    assert int(learn.model.swav_iters) == 2 * len(learn.dls.train)   # a step the scaler skipped still moves the counter
    assert any(not torch.equal(p, q) for p, q in zip(before, learn.model.parameters()))
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())


def test_bf16_autocast(digits64, tmp_path):
    "learn.to_bf16(): bfloat16 scores, finite float32 loss"
    learn = cuda_learner(digits64, tmp_path).to_bf16()
    fit(learn, 1)
    assert learn.loss_log.score_dtypes == {torch.bfloat16} and all(np.isfinite(learn.loss_log.losses))


def test_checkpoint_keeps_cuda_random_state(digits64, tmp_path):
    "Interrupted after epoch 1, saved, loaded into a fresh model: the CUDA random state and the losses retrace the full run"
    full = cuda_learner(digits64, tmp_path)
    fit(full)
    stop = helpers.Interrupt(1, keep=cuda_rng)
    first = cuda_learner(digits64, tmp_path, cbs=[stop])
    fit(first)
    states = first.model.random_state.states
    assert int(states[0][2]) == torch.cuda.device_count()   # rng_state_tensor: [header length, loaders, CUDA states, ...]
    first.save("ckpt")

    torch.manual_seed(123); torch.cuda.manual_seed_all(123); random.seed(123); np.random.seed(123)
    at1 = helpers.KeepAt(1, keep=cuda_rng)
    resumed = cuda_learner(digits64, tmp_path, model_seed=1, cbs=[at1]).load("ckpt")
    fit(resumed, start_epoch=1)
    assert torch.equal(at1.kept, stop.kept)
    n = len(full.dls.train)
    torch.testing.assert_close(torch.tensor(resumed.loss_log.losses), torch.tensor(full.loss_log.losses[n:]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(resumed.swav.queue, full.swav.queue, atol=1e-4, rtol=1e-4)


@pytest.fixture
def nccl_group(tmp_path):
    "A one-process NCCL group on GPU 0 (NCCL refuses two ranks on one GPU), destroyed after the test"
    if not dist.is_nccl_available(): pytest.skip("this torch has no NCCL")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try: yield
    finally: dist.destroy_process_group()


def test_sync_batchnorm_and_nccl(nccl_group):
    "SyncBatchNorm conversion leaves no BatchNorm, trains like BatchNorm on one process; Sinkhorn's all-reduces run on NCCL"
    torch.manual_seed(0)
    model = helpers.tiny_swav_model(bn=True).cuda()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(helpers.tiny_swav_model(bn=True)).cuda()
    synced.load_state_dict(model.state_dict())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) >= 2
    x = [torch.rand(8, 1, 16, 16, device="cuda"), torch.rand(8, 1, 8, 8, device="cuda")]
    (e0, s0), (e1, s1) = model(x), synced(x)
    torch.testing.assert_close(e1, e0, atol=1e-5, rtol=1e-4); torch.testing.assert_close(s1, s0, atol=1e-5, rtol=1e-4)
    s1.float().pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in synced.parameters() if p.requires_grad)
    scores = helpers_scores(256, 300)
    codes = sinkhorn_knopp(scores)                       # all-reduces over the one-process group
    torch.testing.assert_close(codes.double().cpu(), official_sinkhorn(scores.double().cpu()), atol=1e-5, rtol=1e-4)


def helpers_scores(n: int, n_protos: int, dim: int = 128, seed: int = 0) -> torch.Tensor:
    "Cosine scores of random unit embeddings and prototypes, on the GPU"
    g = torch.Generator().manual_seed(seed)
    z = nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    w = nn.functional.normalize(torch.randn(n_protos, dim, generator=g), dim=1)
    return (z @ w.T).cuda()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.05, 0.01])
def test_sinkhorn_under_cuda_autocast(dtype, eps):
    "Half-precision scores under autocast: float32 codes, finite, close to the float64 official algorithm, with and without a queue"
    s = helpers_scores(2 * 256, 3000)
    q = helpers_scores(2 * 3840, 3000, seed=1).view(2, 3840, 3000)
    with torch.autocast("cuda", dtype=dtype):
        codes = sinkhorn_knopp(s.to(dtype), eps)
        qcodes = swav_codes(s.to(dtype), 256, CROP_IDS, eps, 3, q.to(dtype))
    assert codes.dtype == qcodes.dtype == torch.float32 and torch.isfinite(codes).all() and torch.isfinite(qcodes).all()
    ref = official_sinkhorn(s.to(dtype).double().cpu(), eps)
    torch.testing.assert_close(codes.double().cpu(), ref, atol=2e-3, rtol=0)
    for i, (o, qq) in enumerate(zip(s.to(dtype).view(2, 256, -1), q.to(dtype))):
        ref_q = official_sinkhorn(torch.cat([qq, o]).double().cpu(), eps)[-256:]
        torch.testing.assert_close(qcodes[i].double().cpu(), ref_q, atol=2e-3, rtol=0)


def test_default_pipelines_on_cuda():
    "Every transform of the default multi-crop forced on, on a CUDA batch: crops stay on the GPU, finite, of the declared sizes"
    from kornia.enhance import adjust_hue
    from self_supervised_swav.augmentations import shift_hue
    from self_supervised_swav.swav import get_swav_aug_pipelines
    x = torch.rand(8, 3, 64, 64, device="cuda")
    hue = torch.rand(8) - 0.5                        # on the CPU, as kornia draws its factors
    torch.testing.assert_close(shift_hue(x, hue), adjust_hue(x, hue.cuda()), atol=1e-4, rtol=0)
    augs = get_swav_aug_pipelines(num_crops=[2, 4], crop_sizes=[32, 16], flip_p=1., rotate_p=1., jitter_p=1., bw_p=1., blur_p=1.)
    crops = augs(x)
    assert [c.shape for c in crops] == [torch.Size([8, 3, 32, 32])] * 2 + [torch.Size([8, 3, 16, 16])] * 4
    assert all(c.device.type == "cuda" and torch.isfinite(c).all() for c in crops)
