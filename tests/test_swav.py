"Properties of the SwAV pieces: Sinkhorn, codes and loss, the queue, prototypes, and the SWAV callback end to end."
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from fastai.callback.core import Callback, CancelFitException
from fastai.data.core import Pipeline
from fastai.learner import Learner

import self_supervised_swav.swav as swav_mod
from self_supervised_swav.checks import SettingError
from self_supervised_swav.layers import create_encoder, create_fastai_encoder
from self_supervised_swav.augmentations import MultiCrop
from self_supervised_swav.swav import (SWAV, create_swav_model, get_swav_aug_pipelines, sinkhorn_knopp,
                                        swav_codes, swav_loss)
from helpers import official_sinkhorn as ref_sinkhorn, official_swav_loss as ref_loss, tiny_pipelines, tiny_swav_model


def cosine_scores(n, k, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1) @ F.normalize(torch.randn(k, d, generator=g), dim=1).T


# ---------------------------------------------------------------- Sinkhorn
@pytest.mark.parametrize("eps", [0.01, 0.03, 0.05, 0.1])
@pytest.mark.parametrize("n_iters", [1, 3, 10])
@pytest.mark.parametrize("B,K", [(1, 7), (64, 30), (200, 300)])
def test_sinkhorn_matches_reference(eps, n_iters, B, K):
    s = cosine_scores(B, K)
    test = sinkhorn_knopp(s, eps=eps, n_sinkh_iter=n_iters)
    torch.testing.assert_close(test, ref_sinkhorn(s, eps, n_iters).float(), atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("B,K", [(1, 5), (64, 30), (512, 100)])
def test_sinkhorn_constraints(B, K):
    s = cosine_scores(B, K)
    codes = sinkhorn_knopp(s, eps=0.05, n_sinkh_iter=3)
    assert (codes >= 0).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(B))                      # each sample: a distribution
    converged = sinkhorn_knopp(s, eps=0.05, n_sinkh_iter=200)
    torch.testing.assert_close(converged.sum(0), torch.full((K,), B / K), rtol=1e-3, atol=1e-4)  # equal partition


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.01, 0.05, 0.1])
def test_sinkhorn_low_precision_input(dtype, eps):
    s = cosine_scores(256, 300)
    codes = sinkhorn_knopp(s.to(dtype), eps=eps)
    assert codes.dtype == torch.float32 and torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(256))
    torch.testing.assert_close(codes, ref_sinkhorn(s.to(dtype).float(), eps, 3).float(), atol=2e-5, rtol=1e-3)


def test_sinkhorn_stable_where_plain_float32_overflows():
    s = cosine_scores(128, 50)
    s[0] = 1.0                                        # exp(1/0.01) = inf in float32
    assert not torch.isfinite(torch.exp(s / 0.01)).all()
    codes = sinkhorn_knopp(s, eps=0.01)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes, ref_sinkhorn(s, 0.01, 3).float(), atol=2e-5, rtol=1e-3)


def test_sinkhorn_far_sample_keeps_a_code():
    "A sample far from every prototype (its scores all underflow after the prototype shift) still gets a code"
    s = torch.full((16, 8), 1.0)
    s[3] = -1.0
    codes = sinkhorn_knopp(s, eps=0.01)
    torch.testing.assert_close(codes.sum(1), torch.ones(16))


def test_sinkhorn_batched_equals_separate():
    s = torch.stack([cosine_scores(40, 20, seed=i) for i in range(3)])
    batched = sinkhorn_knopp(s)
    for i in range(3): torch.testing.assert_close(batched[i], sinkhorn_knopp(s[i]))


def test_sinkhorn_keep_last_is_the_tail_of_the_full_codes():
    "keep_last=n: the codes of the last n samples (the batch after its queue), computed over all rows"
    s = torch.stack([cosine_scores(50, 20, seed=i) for i in range(2)])
    full = sinkhorn_knopp(s)
    torch.testing.assert_close(sinkhorn_knopp(s, keep_last=8), full[:, -8:], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sinkhorn_knopp(s[0], keep_last=8), full[0, -8:], rtol=1e-6, atol=1e-7)


def test_sinkhorn_does_not_modify_input_and_needs_no_grad():
    s = cosine_scores(32, 10).requires_grad_()
    before = s.detach().clone()
    codes = sinkhorn_knopp(s)
    assert not codes.requires_grad
    torch.testing.assert_close(s.detach(), before)


@pytest.mark.parametrize("kw,msg", [(dict(eps=0), "eps"), (dict(eps=-1), "eps"), (dict(n_sinkh_iter=0), "n_sinkh_iter"),
                                    (dict(n_sinkh_iter=1.5), "n_sinkh_iter")])
def test_sinkhorn_bad_args(kw, msg):
    with pytest.raises(ValueError, match=msg): sinkhorn_knopp(cosine_scores(4, 3), **kw)
    with pytest.raises(ValueError, match="scores"): sinkhorn_knopp(torch.zeros(3))


# ---------------------------------------------------------------- codes and loss
@pytest.mark.parametrize("n_crops,ids", [(8, [0, 1]), (8, [6, 7]), (8, [0, 3]), (2, [0, 1]), (3, [2]), (4, [0, 1, 2, 3])])
@pytest.mark.parametrize("bs", [1, 16])
@pytest.mark.parametrize("with_queue", [False, True])
def test_loss_matches_official(n_crops, ids, bs, with_queue):
    output = cosine_scores(n_crops * bs, 30, seed=bs + n_crops).requires_grad_()
    queue_out = cosine_scores(len(ids) * 48, 30, seed=99).view(len(ids), 48, 30) if with_queue else None
    codes = swav_codes(output, bs, ids, eps=0.05, n_sinkh_iter=3, queue_scores=queue_out)
    assert codes.shape == (len(ids), bs, 30)
    for i, c in enumerate(ids):                                   # codes only from the assignment crops
        out = output[bs * c: bs * (c + 1)].detach()
        if with_queue: out = torch.cat([queue_out[i], out])
        torch.testing.assert_close(codes[i], ref_sinkhorn(out, 0.05, 3)[-bs:].float(), atol=2e-5, rtol=1e-3)
    loss = swav_loss(output, codes, ids, temp=0.1)
    ref = ref_loss(output, bs, ids, n_crops, queue_out=queue_out)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-4)
    g, = torch.autograd.grad(loss, output)
    g_ref, = torch.autograd.grad(ref, output)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-3)


def test_identical_views_lower_loss():
    z = F.normalize(torch.randn(32, 16), dim=1)
    protos = F.normalize(torch.randn(30, 16), dim=1)
    same = (z @ protos.T).repeat(4, 1)
    rand = F.normalize(torch.randn(4 * 32, 16), dim=1) @ protos.T
    loss = lambda s: swav_loss(s, swav_codes(s, 32, [0, 1]), [0, 1]).item()
    assert loss(same) < loss(rand) - 0.05


# ---------------------------------------------------------------- the callback: helpers
class Spy(Callback):
    "Records the embeddings of every training batch and what Sinkhorn gets"
    order = 20
    def __init__(self): self.embs, self.protos_norms = [], []
    def after_pred(self):
        if self.training: self.embs.append(self.learn.pred[0].detach().clone())
        self.protos_norms.append(self.learn.model.prototypes.weight.detach().norm(dim=1).clone())


def spy_codes(monkeypatch):
    "Record (queue_scores, scores, bs, training) of every swav_codes call"
    calls, orig = [], swav_mod.swav_codes
    def wrapped(scores, bs, ids, eps, n_iters, queue_scores=None):
        calls.append((None if queue_scores is None else queue_scores.clone(), scores.detach().clone(), bs))
        return orig(scores, bs, ids, eps, n_iters, queue_scores)
    monkeypatch.setattr(swav_mod, "swav_codes", wrapped)
    return calls


def make_learn(dls, cb, model=None, **kw):
    return Learner(dls, model or tiny_swav_model(n_protos=20), cbs=[cb], **kw)


# ---------------------------------------------------------------- queue
@pytest.mark.parametrize("ids", [[0, 1], [2, 3], [0, 3]])
def test_queue_holds_last_embeddings_of_each_crop(tiny_dls, ids):
    spy = Spy()
    cb = SWAV(tiny_pipelines(), crop_assgn_ids=ids, K=48, queue_start_pct=0.0)
    learn = Learner(tiny_dls, tiny_swav_model(n_protos=20), cbs=[cb, spy])
    learn.fit(1)
    bs, n_crops = 32, 4
    assert learn.swav.queue.shape == (len(ids), 48, 16)
    for i, c in enumerate(ids):
        newest_first = torch.cat([e.view(n_crops, bs, -1)[c] for e in reversed(spy.embs)])
        torch.testing.assert_close(learn.swav.queue[i], newest_first[:48])
    assert learn.swav.queue_filled == 48 and int(learn.model.queue.filled) == 48


def test_queue_start_fill_and_use(tiny_dls, monkeypatch):
    calls = spy_codes(monkeypatch)
    cb = SWAV(tiny_pipelines(), crop_assgn_ids=[0, 1], K=64, queue_start_pct=0.4)   # 5 batches/epoch: fill from batch 2
    learn = make_learn(tiny_dls, cb)
    learn.fit(1)
    train_calls = calls[:5]
    # pct_train = 0, .2, .4, .6, .8: filling starts at batch 2 (pct .4); 64 = 2 batches: full after batch 3; used at 4
    assert [c[0] is not None for c in train_calls] == [False, False, False, False, True]
    assert learn.swav.queue_filled == 64
    for q, *_ in train_calls[4:5]: assert q.shape == (2, 64, 20)


def test_no_sample_twice_in_sinkhorn(tiny_dls, monkeypatch):
    calls = spy_codes(monkeypatch)
    learn = make_learn(tiny_dls, SWAV(tiny_pipelines(), crop_assgn_ids=[0, 1], K=64, queue_start_pct=0.0))
    learn.fit(2)
    used = [(q, s, bs) for q, s, bs in calls if q is not None]
    assert used, "the queue was never used"
    for q, s, bs in used:
        batch = s.view(-1, bs, s.shape[-1])[[0, 1]]                  # [A, bs, K]
        for a in range(2):
            d = torch.cdist(batch[a].double(), q[a].double())        # a repeated sample has identical scores
            assert d.min() > 1e-6
            assert torch.cdist(q[a].double(), q[a].double()).add(torch.eye(len(q[a])).double()).min() > 1e-6


def test_validation_does_not_touch_queue(tiny_dls):
    learn = make_learn(tiny_dls, SWAV(tiny_pipelines(), crop_assgn_ids=[0, 1], K=64, queue_start_pct=0.0))
    learn.fit(1)
    queue, n, iters = learn.swav.queue.clone(), learn.swav.queue_filled, int(learn.model.swav_iters)
    learn.validate()
    torch.testing.assert_close(learn.swav.queue, queue)
    assert learn.swav.queue_filled == n and int(learn.model.swav_iters) == iters


def test_partial_last_batch_and_K_not_multiple_of_bs(digits):
    from self_supervised_swav.data import image_tensor_dls
    x, y = digits
    dls = image_tensor_dls(x[:100], y[:100], valid_pct=0.2, bs=32, device="cpu", drop_last=False)  # 80 = 32+32+16
    spy = Spy()
    learn = Learner(dls, tiny_swav_model(n_protos=20), cbs=[SWAV(tiny_pipelines(), crop_assgn_ids=[0, 1], K=50, queue_start_pct=0.0), spy])
    learn.fit(1)
    assert [e.shape[0] // 4 for e in spy.embs] == [32, 32, 16]
    newest_first = torch.cat([e.view(4, -1, 16)[0] for e in reversed(spy.embs)])
    torch.testing.assert_close(learn.swav.queue[0], newest_first[:50])
    assert math.isfinite(learn.recorder.losses[-1])


def test_no_queue(tiny_dls, monkeypatch):
    calls = spy_codes(monkeypatch)
    learn = make_learn(tiny_dls, SWAV(tiny_pipelines(), crop_assgn_ids=[0, 1], K=None))
    learn.fit(1)
    assert all(q is None for q, *_ in calls) and learn.swav.queue is None


def fit_save_and_load(dls, path, K_loaded: int):
    "(a learner fitted for 1 epoch with a queue of 64, saved as 'ckpt'; a new learner with a queue of `K_loaded` that loaded it)"
    learn = make_learn(dls, SWAV(tiny_pipelines(), crop_assgn_ids=[0, 1], K=64, queue_start_pct=0.0), path=path)
    learn.fit(1)
    learn.save("ckpt")
    return learn, make_learn(dls, SWAV(tiny_pipelines(), crop_assgn_ids=[0, 1], K=K_loaded, queue_start_pct=0.0), path=path).load("ckpt")


def test_queue_saved_and_loaded(tiny_dls, tmp_path):
    learn, fresh = fit_save_and_load(tiny_dls, tmp_path, 64)
    torch.testing.assert_close(fresh.model.queue.embeddings, learn.model.queue.embeddings)
    assert fresh.swav.queue_filled == int(fresh.model.queue.filled) == 64 and int(fresh.model.swav_iters) == 5


def test_loaded_queue_of_other_shape_is_a_clear_error(tiny_dls, tmp_path):
    learn, other = fit_save_and_load(tiny_dls, tmp_path, 96)
    with pytest.raises(ValueError, match="reset_queue"): other.fit(1)
    other.swav.reset_queue()
    assert other.swav.queue.shape == (2, 96, 16) and other.swav.queue_filled == 0


# ---------------------------------------------------------------- prototypes
def test_prototypes_unit_norm_and_frozen_then_moving(tiny_dls):
    class Snap(Callback):
        order = 20
        def __init__(self): self.ws = []
        def after_step(self): self.ws.append(self.learn.model.prototypes.weight.detach().clone())
    spy, snap = Spy(), Snap()
    learn = Learner(tiny_dls, tiny_swav_model(n_protos=20), cbs=[SWAV(tiny_pipelines(), [0, 1], K=None, freeze_protos_iters=3), spy, snap], lr=1e-2)
    w0 = learn.model.prototypes.weight.detach().clone()
    learn.fit(2)
    for n in spy.protos_norms: torch.testing.assert_close(n, torch.ones_like(n))   # unit norm at every forward
    for w in snap.ws[:3]: torch.testing.assert_close(w, w0, atol=1e-6, rtol=0)      # frozen for 3 iterations
    assert (snap.ws[3] - w0).abs().max() > 1e-4                                     # moving afterwards
    assert int(learn.model.swav_iters) == 10


# ---------------------------------------------------------------- loss function swap
def test_loss_func_restored_after_fit_and_cancel(tiny_dls):
    class Stop(Callback):
        def after_batch(self): raise CancelFitException()
    learn = Learner(tiny_dls, tiny_swav_model(n_protos=20), cbs=[SWAV(tiny_pipelines(), [0, 1], K=None)])
    orig = learn.loss_func
    learn.fit(1, cbs=Stop())
    assert learn.loss_func is orig
    learn.fit(1)
    assert learn.loss_func is orig


def test_validation_loss_uses_the_swav_formula(tiny_dls):
    learn = make_learn(tiny_dls, SWAV(tiny_pipelines(), [0, 1], K=None))
    learn.fit(1)
    valid_loss = learn.recorder.values[-1][1]
    assert math.isfinite(valid_loss) and 0 < valid_loss < 2 * math.log(20) + 1


# ---------------------------------------------------------------- end to end
def test_pretraining_lowers_loss(digits):
    from self_supervised_swav.data import image_tensor_dls
    torch.manual_seed(0)
    x, y = digits
    dls = image_tensor_dls(x[:320], y[:320], bs=64, device="cpu")
    model = create_swav_model(create_encoder("resnet10t", n_in=1, pretrained=False), hidden_size=64, projection_size=32, n_protos=30)
    learn = Learner(dls, model, cbs=SWAV(tiny_pipelines(sizes=(16, 8)), [0, 1], K=None, freeze_protos_iters=4), lr=3e-3)
    learn.fit(4)
    losses = [v[0] for v in learn.recorder.values]
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("arch,n_in", [("xresnet18", 1), ("resnet10t", 3)])
def test_encoders_and_channels(digits, arch, n_in):
    from self_supervised_swav.data import image_tensor_dls
    x, y = digits
    if n_in == 3: x = x.expand(-1, 3, -1, -1)
    dls = image_tensor_dls(x[:80], y[:80], bs=32, device="cpu")
    enc = create_fastai_encoder(__import__("fastai.vision.models.xresnet", fromlist=[arch]).__dict__[arch], n_in=n_in, pretrained=False) \
        if arch.startswith("x") else create_encoder(arch, n_in=n_in, pretrained=False)
    pipes = get_swav_aug_pipelines(num_crops=[2, 2], crop_sizes=[24, 12], min_scales=[0.3, 0.1], max_scales=[1.0, 0.4],
                                   stats=None if n_in == 1 else ([0.5] * 3, [0.25] * 3))   # full paper recipe on gray and RGB
    learn = Learner(dls, create_swav_model(enc, hidden_size=64, projection_size=32, n_protos=20), cbs=SWAV(pipes, [0, 1], K=None))
    learn.fit(1)
    assert all(math.isfinite(float(l)) for l in learn.recorder.losses)


def test_show_draws_images_and_crops(tiny_dls):
    import matplotlib
    matplotlib.use("Agg")
    learn = make_learn(tiny_dls, SWAV(tiny_pipelines(), [0, 1], K=None))
    fig = learn.swav.show(n=3)
    assert len(fig.axes) == 3 * 5
    assert fig.axes[0].get_title() == "image" and fig.axes[1].get_title() == "crop 0"
    shapes = [ax.get_images()[0].get_array().shape[:2] for ax in fig.axes[:5]]
    assert shapes == [(24, 24), (16, 16), (16, 16), (8, 8), (8, 8)]


def test_crops_of_one_size_made_together_are_independent():
    "Identical pipelines run as one group: the crops keep their shapes, differ from each other, and keep the pipeline's statistics"
    pipes = get_swav_aug_pipelines(num_crops=[2, 3], crop_sizes=[16, 8], min_scales=[0.3, 0.05], max_scales=[1., 0.3])
    cb = SWAV(pipes, [0, 1], K=None)
    assert groups(cb) == [(0, 2), (2, 5)]
    torch.manual_seed(0)
    x = torch.rand(2048, 3, 20, 20)
    crops = cb.augs(x)
    assert [tuple(c.shape) for c in crops] == [(2048, 3, 16, 16)] * 2 + [(2048, 3, 8, 8)] * 3
    for i, j in [(0, 1), (2, 3), (3, 4), (2, 4)]: assert not torch.allclose(crops[i], crops[j])
    one_by_one = [p(x) for p in pipes]   # the same distribution as pipeline by pipeline: normalised pixels' mean and spread
    for c, d in zip(crops, one_by_one):
        assert abs(c.mean() - d.mean()) < 0.12 and abs(c.std() / d.std() - 1) < 0.1   # seeds 0-5: at most 0.07 and 0.06
    same = get_swav_aug_pipelines(num_crops=[2, 3], crop_sizes=[16, 8], min_scales=[0.3, 0.05], max_scales=[1., 0.3], same_on_batch=True)
    assert groups(SWAV(same, [0, 1], K=None)) == [(i, i + 1) for i in range(5)]


def groups(cb: SWAV) -> list[tuple[int, int]]: return cb.augs.group_ranges()


def test_replaced_or_changed_pipelines_are_used(tiny_dls):
    "A new MultiCrop or list assigned to learn.swav.augs is checked and used with its groups (a plain list: one crop per group)"
    learn = make_learn(tiny_dls, SWAV(tiny_pipelines(), [0, 1], K=None))
    learn.swav.augs = tiny_pipelines(num_crops=(2, 3))
    assert groups(learn.swav) == [(0, 2), (2, 5)]
    assert [c.shape[-1] for c in learn.swav.augs(torch.rand(4, 1, 24, 24))] == [16, 16, 8, 8, 8]
    learn.swav.augs = list(tiny_pipelines(num_crops=(2, 3)))
    assert isinstance(learn.swav.augs, MultiCrop) and groups(learn.swav) == [(i, i + 1) for i in range(5)]
    learn.fit(1)
    with pytest.raises(ValueError, match="at least 2 crops"): learn.swav.augs = tiny_pipelines()[:1]
    with pytest.raises(SettingError, match="aug_pipelines"): learn.swav.augs = [lambda x: x] * 2
    learn.swav.augs = tiny_pipelines(num_crops=(1, 1))   # 2 crops: crop_assgn_ids [0, 1] still valid
    learn.fit(1)
    learn.swav.crop_assgn_ids = [0, 3]
    with pytest.raises(ValueError, match="crop_assgn_ids"): learn.fit(1)


def test_print_augs(tiny_dls, capsys):
    learn = make_learn(tiny_dls, SWAV(tiny_pipelines(), [0, 1], K=None, print_augs=True))
    learn.fit(1)
    assert "RandomResizedCrop" in capsys.readouterr().out


# ---------------------------------------------------------------- user mistakes
@pytest.mark.parametrize("kw,err,msg", [
    (dict(crop_assgn_ids=[0, 4]), ValueError, "crop_assgn_ids"),
    (dict(crop_assgn_ids=[-1]), ValueError, "crop_assgn_ids"),
    (dict(crop_assgn_ids=[1, 1]), ValueError, "duplicated"),
    (dict(crop_assgn_ids=[]), ValueError, "crop_assgn_ids"),
    (dict(crop_assgn_ids=0), ValueError, "crop_assgn_ids"),
    (dict(K=0), ValueError, "K must"),
    (dict(K=-5), ValueError, "K must"),
    (dict(K=10.5), ValueError, "K must"),
    (dict(eps=0), ValueError, "eps must"),
    (dict(temp=0), ValueError, "temp must"),
    (dict(n_sinkh_iter=0), ValueError, "n_sinkh_iter"),
    (dict(queue_start_pct=1.5), ValueError, "queue_start_pct"),
    (dict(freeze_protos_iters=-1), ValueError, "freeze_protos_iters"),
])
def test_bad_settings(kw, err, msg):
    args = dict(aug_pipelines=tiny_pipelines(), crop_assgn_ids=[0, 1])
    args.update(kw)
    with pytest.raises(err, match=msg): SWAV(**args)


@pytest.mark.parametrize("pipes,err,msg", [
    ([], ValueError, "empty"),
    (None, SettingError, "aug_pipelines"),
    ("pipelines", SettingError, "aug_pipelines"),
    ([lambda x: x, lambda x: x], SettingError, r"aug_pipelines\[0\]"),
    ([Pipeline([]), Pipeline([])], ValueError, "split_idx"),
])
def test_bad_pipelines(pipes, err, msg):
    with pytest.raises(err, match=msg): SWAV(pipes, crop_assgn_ids=[0])


def test_single_crop_is_an_error():
    with pytest.raises(ValueError, match="at least 2 crops"): SWAV(tiny_pipelines()[:1], crop_assgn_ids=[0])


def test_model_without_prototypes(tiny_dls):
    learn = Learner(tiny_dls, nn.Sequential(nn.Flatten(), nn.Linear(24 * 24, 10)), cbs=SWAV(tiny_pipelines(), [0, 1], K=None))
    with pytest.raises(SettingError, match="prototypes"): learn.fit(1)


@pytest.mark.parametrize("n_protos,K,warns", [(64, None, True), (32, None, False), (64, 64, False)])
def test_warns_when_batch_smaller_than_prototypes_without_queue(tiny_dls, n_protos, K, warns):
    "Batches of 32 without a queue: Sinkhorn must spread each code over >= n_protos / 32 prototypes"
    learn = make_learn(tiny_dls, SWAV(tiny_pipelines(), [0, 1], K=K), model=tiny_swav_model(n_protos=n_protos))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        learn.fit(1)
    msgs = [str(x.message) for x in w if "prototypes" in str(x.message)]
    assert bool(msgs) == warns, msgs
    if warns: assert "batches of 32 images for 64 prototypes" in msgs[0] and "n_protos <= 32" in msgs[0] and "queue (K" in msgs[0]


def test_plain_torch_dataloaders(digits):
    "fastai DataLoaders over torch's own loaders: training, the end-of-epoch random state, and the batch size check"
    from fastai.data.core import DataLoaders
    from fastcore.basics import noop
    from torch.utils.data import DataLoader, TensorDataset
    ds = TensorDataset(*[t[:128] for t in digits])
    dls = DataLoaders(DataLoader(ds, batch_size=32, shuffle=True, drop_last=True), DataLoader(ds, batch_size=32))
    learn = Learner(dls, tiny_swav_model(n_protos=64), cbs=SWAV(tiny_pipelines(), [0, 1], K=None), loss_func=noop)
    with pytest.warns(UserWarning, match="batches of 32 images for 64 prototypes"): learn.fit(1)
    assert len(learn.recorder.losses) == 4 and all(math.isfinite(float(l)) for l in learn.recorder.losses)
    assert learn.model.random_state.saved_epoch == 0 and learn.model.random_state.states.numel() > 0


def test_K_larger_than_dataset(tiny_dls):
    learn = make_learn(tiny_dls, SWAV(tiny_pipelines(), [0, 1], K=1000))
    with pytest.raises(ValueError, match="larger than the training set"): learn.fit(1)


@pytest.mark.parametrize("kw,msg", [
    (dict(num_crops=[2], crop_sizes=[16, 8]), "one value per crop size"),
    (dict(crop_sizes=[16, -8]), "crop_sizes"),
    (dict(num_crops=[2, 0]), "num_crops"),
    (dict(min_scales=[0.5, 0.3], max_scales=[0.4, 0.5]), "min_scales"),
    (dict(min_scales=[0.0, 0.3]), "min_scales"),
    (dict(recipe="byol"), "recipe"),
])
def test_bad_pipeline_settings(kw, msg):
    args = dict(num_crops=[2, 2], crop_sizes=[16, 8], min_scales=[0.3, 0.1], max_scales=[1.0, 0.4])
    args.update(kw)
    with pytest.raises(ValueError, match=msg): get_swav_aug_pipelines(**args)


def test_create_swav_model_bad_args():
    enc = create_encoder("resnet10t", pretrained=False)
    with pytest.raises(SettingError, match="create_encoder"): create_swav_model("resnet10t")
    with pytest.raises(ValueError, match="n_protos"): create_swav_model(enc, n_protos=0)


# ---------------------------------------------------------------- fastai habits with SWAV attached (get_preds, validate, predict, show_results)
from fastai.callback.core import CancelFitException as _CancelFit
from self_supervised_swav.data import image_tensor_dls
from helpers import HandMadeSwAV


class StopAtStart(Callback):
    "Ends fit after before_fit: SWAV's checks and warnings run, no batch does"
    def before_epoch(self): raise _CancelFit()


def normalised_pipes(sizes=(16, 8)):
    return get_swav_aug_pipelines(num_crops=[2, 2], crop_sizes=list(sizes), min_scales=[0.3, 0.1], max_scales=[1.0, 0.4],
                                  stats=([0.4], [0.3]), jitter=False, bw=False, blur=False)


@pytest.mark.parametrize("fit_first", [False, True])
@pytest.mark.parametrize("ds_idx", [0, 1])
def test_get_preds_is_one_row_per_whole_image(tiny_dls, fit_first, ds_idx):
    model = tiny_swav_model(n_protos=20)
    learn = make_learn(tiny_dls, SWAV(normalised_pipes(), [0, 1], K=None), model=model)
    if fit_first: learn.fit(1)
    orig, protos = learn.loss_func, model.prototypes.weight.detach().clone()
    (emb, scores), targs = learn.get_preds(ds_idx=ds_idx)
    ds = tiny_dls[ds_idx].dataset
    assert emb.shape == (len(ds), 16) and scores.shape == (len(ds), 20)
    with torch.no_grad(): ref_emb, ref_scores = model.eval()([(ds.x - 0.4) / 0.3])   # whole images, the pipelines' normalisation
    torch.testing.assert_close(emb, ref_emb, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-4)
    assert torch.equal(targs, ds.y)                                   # in the order of the data, with its labels
    assert learn.loss_func is orig and torch.equal(model.prototypes.weight, protos)   # nothing changed


def test_get_preds_with_a_hand_made_model_and_no_labels(digits):
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastcore.basics import noop
    imgs = [(t,) for t in digits[0][:70]]
    dls = DataLoaders(DataLoader(imgs, bs=32, shuffle=True, drop_last=True), DataLoader(imgs[:37], bs=16))
    learn = Learner(dls, HandMadeSwAV(n_protos=10), loss_func=noop, cbs=SWAV(tiny_pipelines(), [0, 1], K=None))
    (emb, scores), _ = learn.get_preds()
    assert emb.shape == (37, 16) and scores.shape == (37, 10)


def test_validate_still_reports_the_swav_loss_after_get_preds(tiny_dls):
    learn = make_learn(tiny_dls, SWAV(tiny_pipelines(), [0, 1], K=64, queue_start_pct=0.0))
    learn.fit(1)
    valid_loss = learn.recorder.values[-1][1]
    queue, iters = learn.swav.queue.clone(), int(learn.model.swav_iters)
    learn.get_preds()
    loss = learn.validate()[0]
    assert math.isfinite(loss) and abs(loss - valid_loss) < 0.5      # crops and the SwAV formula, as in fit
    torch.testing.assert_close(learn.swav.queue, queue)
    assert int(learn.model.swav_iters) == iters


def test_get_preds_inside_fit_gives_whole_images(tiny_dls):
    shapes = []
    class PredsAtEpochEnd(Callback):
        order = 60
        def after_epoch(self): shapes.append([t.shape for t in self.learn.get_preds(inner=True)[0]])
    learn = make_learn(tiny_dls, SWAV(tiny_pipelines(), [0, 1], K=None))
    learn.fit(1, cbs=PredsAtEpochEnd())
    assert shapes == [[(40, 16), (40, 20)]] and math.isfinite(learn.recorder.values[-1][1])


def test_what_get_preds_cannot_give_is_a_clear_error(tiny_dls):
    learn = make_learn(tiny_dls, SWAV(tiny_pipelines(), [0, 1], K=None))
    orig = learn.loss_func
    with pytest.raises(ValueError, match=r"with_loss=True.*learn\.validate\(\)"): learn.get_preds(with_loss=True)
    for call in (lambda: learn.get_preds(with_decoded=True), lambda: learn.show_results(),
                 lambda: learn.predict(tiny_dls.valid.dataset.x[0])):
        with pytest.raises(ValueError, match="nothing to decode.*get_preds\\(\\).*assign_prototypes") as e: call()
        assert "\n" not in str(e.value)
    assert learn.loss_func is orig


def test_show_prototypes_draws_the_grid(tiny_dls):
    from self_supervised_swav.clusters import assign_prototypes, show_learner_prototypes
    learn = make_learn(tiny_dls, SWAV(normalised_pipes(), [0, 1], K=None))
    fig = show_learner_prototypes(learn, n_rows=3, n_images=4)
    assert len(fig.axes) == 12
    sizes = assign_prototypes(learn.model, tiny_dls.valid.dataset.x, tfm=lambda x: (x - 0.4) / 0.3).sizes
    largest = sizes.argsort(descending=True, stable=True)[:3].tolist()
    assert [fig.axes[4 * r].get_title(loc="left") for r in range(3)] == \
        [f"prototype {p}: {int(sizes[p])} image{'s' if sizes[p] != 1 else ''}" for p in largest]
    fig = show_learner_prototypes(learn, tiny_dls.train, protos=[0, 5], n_images=2, max_images=10)
    assert len(fig.axes) == 4
    with pytest.raises(ValueError, match="max_images"): show_learner_prototypes(learn, max_images=0)


# ---------------------------------------------------------------- batches of one image
@pytest.mark.parametrize("bn", [False, True])
def test_a_last_training_batch_of_one_image_is_skipped_once_warned(digits, bn):
    x, y = digits
    dls = image_tensor_dls(x[:41], y[:41], valid_pct=0.2, bs=32, device="cpu", drop_last=False)   # 33 train: 32 + 1
    learn = Learner(dls, create_swav_model(nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), *([nn.BatchNorm2d(8)] if bn else []),
                                                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                                           hidden_size=32, projection_size=16, n_protos=20),
                    cbs=SWAV(tiny_pipelines(), [0, 1], K=16, queue_start_pct=0.0))
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("default")                              # Python's default: a warning once per place
        learn.fit(2)
    assert sum("single image" in str(w.message) for w in ws) == 1
    assert int(learn.model.swav_iters) == 2 and len(learn.recorder.losses) == 2
    assert learn.swav.queue_filled == 16 and all(math.isfinite(v) for v in learn.recorder.values[-1])


def test_bs_1_is_an_error_before_training(digits):
    x, y = digits
    learn = Learner(image_tensor_dls(x[:20], y[:20], bs=1, device="cpu"), tiny_swav_model(n_protos=20), cbs=SWAV(tiny_pipelines(), [0, 1], K=None))
    orig = learn.loss_func
    with pytest.raises(ValueError, match=r"bs=1.*bs >= 2"): learn.fit(1)
    assert int(learn.model.swav_iters) == 0 and learn.loss_func is orig


# ---------------------------------------------------------------- warnings and checks at the start of fit
@pytest.mark.parametrize("ids,K,expected", [
    ([0, 1], None, []), ([0, 1], 64, []), ([0, 1], 32, []),
    ([0, 1], 16, ["shorter than the global batch of 32"]),
    ([2, 3], None, ["codes from crops [2, 3] of [8, 8] px while other crops are 16 px"]),
    ([0, 3], 8, ["shorter than the global batch", "codes from crops [3] of [8] px"]),
])
def test_start_of_fit_warnings(tiny_dls, ids, K, expected):
    learn = make_learn(tiny_dls, SWAV(tiny_pipelines(), ids, K=K))
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        learn.fit(1, cbs=StopAtStart())
    msgs = [str(w.message) for w in ws if str(w.message).startswith("SWAV") and "prototypes: the equal-use" not in str(w.message)]
    assert len(msgs) == len(expected) and all(any(e in m for m in msgs) for e in expected), msgs


def test_crop_sizes_read_from_the_pipelines():
    assert tiny_pipelines(sizes=(16, 8)).crop_sizes == [16, 16, 8, 8]
    assert MultiCrop([Pipeline([], split_idx=0)] * 2).crop_sizes == [None, None]


def test_encoder_that_cannot_take_a_crop_size_fails_before_training(tiny_dls):
    enc = nn.Sequential(nn.Conv2d(1, 8, 12), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())   # needs >= 12 px
    learn = make_learn(tiny_dls, SWAV(tiny_pipelines(sizes=(16, 8)), [0, 1], K=None), model=create_swav_model(enc, n_protos=20))
    orig = learn.loss_func
    with pytest.raises(ValueError, match=r"cannot take 8 px crops.*smallest crop size it accepts is 16 px") as e: learn.fit(1)
    assert "\n" not in str(e.value).split("\n", 1)[-1] and int(learn.model.swav_iters) == 0 and learn.loss_func is orig
    learn = make_learn(tiny_dls, SWAV(tiny_pipelines(sizes=(16, 12)), [0, 1], K=None), model=create_swav_model(enc, n_protos=20))
    learn.fit(1, cbs=StopAtStart())                                   # 12 px is fine


# ---------------------------------------------------------------- the loss of `fit` is the official formula with the callback's settings
class RecordLoss(Callback):
    "Records, for every training batch, what the official formula needs: the scores, the queue the loss saw, and fit's loss"
    order = 20   # after SWAV (9): the batch is its crops
    def __init__(self): self.rows = []
    def after_pred(self):
        if not self.training: return
        m, cb = self.learn.model, self.learn.swav
        in_use = cb.K is not None and m.queue.full and self.learn.pct_train >= cb.queue_start_pct
        self.rows.append(dict(scores=self.learn.pred[1].detach().clone(), bs=len(self.learn.yb[0]),
                              queue=(m.queue.embeddings @ m.prototypes.weight.detach().t()).clone() if in_use else None))
    def after_loss(self):
        if self.training: self.rows[-1]["loss"] = self.learn.loss.detach().clone()


SETTINGS = [dict(), dict(temp=0.3), dict(eps=0.1), dict(n_sinkh_iter=1), dict(crop_assgn_ids=[2, 3]), dict(crop_assgn_ids=[0, 3])]


@pytest.mark.parametrize("K", [None, 64])
@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults")
def test_loss_in_fit_is_the_official_formula_with_the_callbacks_settings(tiny_dls, K, kw):
    "Every training loss of `fit` equals `official_swav_loss` computed with SWAV's temp, eps, n_sinkh_iter, crop_assgn_ids and queue"
    kw = dict(crop_assgn_ids=[0, 1]) | kw
    ids, temp, eps, n_iters = kw["crop_assgn_ids"], kw.get("temp", 0.1), kw.get("eps", 0.05), kw.get("n_sinkh_iter", 3)
    rec = RecordLoss()
    cb = SWAV(tiny_pipelines(), K=K, queue_start_pct=0.0, freeze_protos_iters=0, **kw)
    Learner(tiny_dls, tiny_swav_model(n_protos=20), cbs=[cb, rec]).fit(2)
    n_crops = 4
    assert len(rec.rows) == 10 and (K is None or sum(r["queue"] is not None for r in rec.rows) >= 7)   # the queue took part
    for r in rec.rows:
        ref = ref_loss(r["scores"], r["bs"], ids, n_crops, eps=eps, temp=temp, n_iters=n_iters, queue_out=r["queue"])
        torch.testing.assert_close(r["loss"], ref, atol=1e-5, rtol=1e-4)
    if kw != dict(crop_assgn_ids=[0, 1]):   # the test can tell: the defaults give another loss
        r = rec.rows[-1]
        default = ref_loss(r["scores"], r["bs"], [0, 1], n_crops, queue_out=r["queue"] if ids == [0, 1] else None)
        assert (r["loss"] - default).abs() > 1e-4
