"kNN accuracy, linear probe, feature extraction and the two pretraining monitors: properties and edge cases."
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from fastai.learner import Learner

from self_supervised_swav.checks import SettingError
from self_supervised_swav.evaluation import (KNNMonitor, PrototypeUsage, PrototypeUsageMonitor, collapse_warning,
                                             extract_features, features_knn_accuracy, knn_accuracy, knn_predict,
                                             linear_probe_accuracy, recalibrate_bn)
from self_supervised_swav.layers import create_encoder
from self_supervised_swav.swav import SWAV, create_swav_model, get_swav_aug_pipelines
from helpers import digits_dls


@pytest.fixture(scope="module")
def digits16(digits_at): return digits_at(16)


@pytest.fixture
def small_dls(digits16):
    "96 train / 24 valid gray 16 px digits, 2 training batches of 48"
    return digits_dls(digits16, 120, 48)


def clusters(n_per_class=100, n_classes=10, dim=32, noise=0.05, seed=0):
    "Features around orthogonal class directions (perfectly separable) and their labels"
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = torch.eye(dim)[y] + noise * torch.randn(len(y), dim, generator=g)
    return x, y


def batches(x, y, bs=64):
    "A plain list of (x, y) batches, the simplest iterable DataLoader"
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]


def ref_knn(query, bank, bank_y, n_classes, k, temp):
    "Dense reference: all similarities at once, votes with a Python loop over the neighbours"
    sims = query @ bank.T
    preds = []
    for row in sims:
        top = row.topk(k)
        votes = torch.zeros(n_classes)
        for s, i in zip(top.values, top.indices): votes[bank_y[i]] += math.exp(s / temp)
        preds.append(int(votes.argmax()))
    return torch.tensor(preds)


# ---------------------------------------------------------------- kNN
def test_knn_separable_is_perfect():
    x, y = clusters()
    xq, yq = clusters(n_per_class=30, seed=1)
    acc = knn_accuracy(nn.Identity(), batches(x, y), batches(xq, yq))
    assert acc == 1.0


def test_knn_shuffled_labels_is_chance():
    x, y = clusters(n_per_class=300)
    xq, yq = clusters(n_per_class=200, seed=1)
    g = torch.Generator().manual_seed(2)
    acc = knn_accuracy(nn.Identity(), batches(x, y[torch.randperm(len(y), generator=g)]), batches(xq, yq))
    assert 0.06 < acc < 0.14          # chance is 0.1; 2000 queries: std 0.007


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("temp", [0.07, 0.5])
def test_knn_predict_matches_dense_reference(k, temp):
    g = torch.Generator().manual_seed(k)
    bank, query = F.normalize(torch.randn(200, 8, generator=g), dim=1), F.normalize(torch.randn(50, 8, generator=g), dim=1)
    bank_y = torch.randint(0, 4, (200,), generator=g)
    torch.testing.assert_close(knn_predict(query, bank, bank_y, 4, k=k, temp=temp), ref_knn(query, bank, bank_y, 4, k, temp))


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_knn_chunking_does_not_change_predictions(chunk_size):
    x, y = clusters(noise=0.8)
    bank, query = F.normalize(x, dim=1), F.normalize(clusters(noise=0.8, seed=3)[0], dim=1)
    torch.testing.assert_close(knn_predict(query, bank, y, 10, chunk_size=chunk_size), knn_predict(query, bank, y, 10))


def test_knn_k_larger_than_bank_is_capped():
    x, y = clusters(n_per_class=2, n_classes=3)
    assert features_knn_accuracy(F.normalize(x, dim=1), y, F.normalize(x, dim=1), y, k=100) == 1.0


@pytest.mark.parametrize("kw, msg", [(dict(k=0), "k must"), (dict(k=2.5), "k must"), (dict(temp=0.), "temp must")])
def test_knn_predict_rejects_bad_arguments(kw, msg):
    x, y = clusters(n_per_class=2)
    with pytest.raises(ValueError, match=msg): knn_predict(x, x, y, 10, **kw)


def test_knn_needs_labels_and_data():
    x, y = clusters(n_per_class=2)
    with pytest.raises(ValueError, match="labelled"): knn_accuracy(nn.Identity(), [(x,)], [(x,)])
    with pytest.raises(ValueError, match="no batches"): knn_accuracy(nn.Identity(), [], batches(x, y))
    with pytest.raises(ValueError, match="empty"): knn_predict(x, x[:0], y[:0], 10)


# ---------------------------------------------------------------- features
def test_extract_features_keeps_order_state_and_rng(tiny_dls):
    enc = create_encoder("resnet10t", pretrained=False, n_in=1)
    bn = enc.bn1 if hasattr(enc, "bn1") else next(m for m in enc.modules() if isinstance(m, nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    torch.manual_seed(0); state = torch.get_rng_state()
    feats, labels = extract_features(enc, tiny_dls.train)
    assert torch.equal(labels, tiny_dls.train.dataset.y)            # dataset order, although the train dl shuffles
    assert feats.shape == (160, 1024) and enc.training
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(160))
    assert torch.equal(bn.running_mean, stats)                        # eval mode: BatchNorm statistics untouched
    assert torch.equal(torch.get_rng_state(), state)


def test_extract_features_rejects_unpooled_encoder():
    with pytest.raises(ValueError, match="flat features"):
        extract_features(nn.Conv2d(1, 2, 3), [(torch.zeros(2, 1, 8, 8), torch.zeros(2))])


# ---------------------------------------------------------------- linear probe
def test_linear_probe_separable_and_chance():
    x, y = clusters(noise=0.1)
    xq, yq = clusters(n_per_class=50, noise=0.1, seed=1)
    assert linear_probe_accuracy(x, y, xq, yq, epochs=20) == 1.0
    g = torch.Generator().manual_seed(0)
    assert linear_probe_accuracy(x, y[torch.randperm(len(y), generator=g)], xq, yq, epochs=10) < 0.25


def test_linear_probe_rejects_bad_arguments():
    x, y = clusters(n_per_class=2)
    with pytest.raises(ValueError, match="epochs"): linear_probe_accuracy(x, y, x, y, epochs=0)
    with pytest.raises(ValueError, match="train_labels"): linear_probe_accuracy(x, y[:3], x, y)


# ---------------------------------------------------------------- prototype usage
def test_prototype_usage_counts_and_entropy_bounds():
    g = torch.Generator().manual_seed(0)
    u = PrototypeUsage(temp=0.1)
    for _ in range(3): u.update(torch.randn(50, 20, generator=g))
    assert u.n == 150 and int(u.counts.sum()) == 150
    assert 1 <= u.n_used <= 20
    assert 0 <= u.entropy <= math.log(20) + 1e-6
    with pytest.raises(ValueError, match="temp"): PrototypeUsage(temp=0)


def test_collapse_warning_thresholds():
    assert collapse_warning(1, 3000, 10_000) is not None
    assert collapse_warning(40, 3000, 10_000) is None                  # 1% of 3000 is 30
    assert collapse_warning(29, 3000, 10_000) is not None
    assert collapse_warning(5, 100, 10_000, min_used=10) is not None
    msg = collapse_warning(80, 100, 10_000, loss=math.log(100) + 1e-4)
    assert "ln(n_protos)" in msg and "eps" in msg and "queue" in msg and "freeze_protos_iters" in msg
    assert collapse_warning(80, 100, 10_000, loss=math.log(100) + 0.1) is None


class Collapsed(nn.Module):
    "An encoder that ignores its input"
    def __init__(self): super().__init__(); self.conv, self.w = nn.Conv2d(1, 8, 3), nn.Parameter(torch.randn(8))
    def forward(self, x): return self.conv(x).mean((2, 3)) * 0 + self.w


def swav_learner(dls, encoder, cbs=(), n_protos=20):
    augs = get_swav_aug_pipelines(num_crops=[2, 1], crop_sizes=[16, 8], min_scales=[0.3, 0.1], max_scales=[1., 0.4],
                                  stats=([0.45], [0.25]))
    return Learner(dls, create_swav_model(encoder, n_protos=n_protos),
                   cbs=[SWAV(augs, crop_assgn_ids=[0, 1], K=None, freeze_protos_iters=1), *cbs])


def fit_quietly(learn, epochs=1, lr=1e-3):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learn.fit(epochs, lr)
    return [str(w.message) for w in caught if "SwAV looks collapsed" in str(w.message)]


def test_usage_monitor_flags_collapsed_model(small_dls):
    # lr 0: the model stays the same over the epoch's two batches, so one prototype wins for every crop (with
    # training, the winner can change between the batches as the prototypes move)
    learn = swav_learner(small_dls, Collapsed(), [PrototypeUsageMonitor()])
    flagged = fit_quietly(learn, lr=0.)
    assert learn.prototype_usage_monitor.history[0]["protos_used"] == 1
    assert len(flagged) == 1 and "only 1 of 20 prototypes" in flagged[0]


def test_usage_monitor_quiet_on_healthy_model(small_dls):
    learn = swav_learner(small_dls, create_encoder("resnet10t", pretrained=False, n_in=1), [PrototypeUsageMonitor()])
    assert fit_quietly(learn) == []
    h = learn.prototype_usage_monitor.history[0]
    assert h["protos_used"] > 2 and 0 < h["assign_entropy"] <= math.log(20)
    assert learn.recorder.metric_names[-3:-1] == ["protos_used", "assign_entropy"]
    assert learn.metrics == []                                          # metrics removed after fit


# ---------------------------------------------------------------- KNNMonitor
@pytest.mark.parametrize("recalibrate", [False, True])
def test_knn_monitor_reports_each_epoch_and_changes_nothing(digits16, recalibrate):
    "With recalibrate_bn, the figure is that of a copy with whole-image BatchNorm statistics; training is the same either way"
    from fastai.torch_core import set_seed
    from self_supervised_swav.data import image_tensor_dls
    x, y = digits16
    mon = image_tensor_dls(x[300:500], y[300:500], valid_pct=0.25, bs=50, device="cpu")

    def run(cbs):
        set_seed(0)
        dls = digits_dls((x, y), 120, 48)
        learn = swav_learner(dls, create_encoder("resnet10t", pretrained=False, n_in=1), cbs)
        learn.fit(2, 1e-3)
        return learn
    plain = run([])
    cb = KNNMonitor(mon.train, mon.valid, every=2, recalibrate_bn=recalibrate)
    monitored = run([cb])
    assert cb.values[0] is None and 0.1 < cb.values[1] <= 1          # every=2: only after the second epoch
    assert monitored.recorder.metric_names[-2] == "knn_top1"
    for a, b in zip(plain.model.state_dict().values(), monitored.model.state_dict().values()): assert torch.equal(a, b)
    enc, tfm = copy.deepcopy(monitored.model.encoder), cb._tfm()
    if recalibrate: recalibrate_bn(enc, mon.train, tfm)
    assert cb.values[1] == knn_accuracy(enc, mon.train, mon.valid, tfm=tfm)
    if recalibrate:   # statistics recomputed from scratch on a copy: the same figure whatever the encoder's, which stay
        for m in monitored.model.encoder.modules():
            if isinstance(m, nn.BatchNorm2d): m.running_mean.add_(3.); m.running_var.mul_(100.)
        spoilt = {k: v.clone() for k, v in monitored.model.encoder.state_dict().items()}
        assert cb.evaluate() == cb.values[1]
        for k, v in monitored.model.encoder.state_dict().items(): assert torch.equal(v, spoilt[k]), k


@pytest.mark.parametrize("kw, msg", [(dict(k=0), "k must"), (dict(temp=-1.), "temp must"), (dict(every=0), "every must")])
def test_knn_monitor_rejects_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg): KNNMonitor([], [], **kw)


def test_knn_monitor_needs_an_encoder(small_dls):
    learn = Learner(small_dls, nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 10)), cbs=KNNMonitor(small_dls.train, small_dls.valid))
    with pytest.raises(SettingError, match="encoder"): learn.fit(1)


# ---------------------------------------------------------------- batches of one image
def one_by_one_bn():
    "BatchNorm on a 1x1 map: a single image has one value per channel, which BatchNorm in training mode refuses"
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4), nn.Flatten())


@pytest.mark.parametrize("sizes,merged", [
    ([1] * 9, [2, 2, 2, 2]),          # single images merged in pairs; the ninth, alone at the end, left out
    ([4, 4, 1], [4, 4]),              # a last batch of one image left out
    ([1, 4, 4], [5, 4]),              # a single image merged into the next batch
    ([4, 1, 4], [4, 5]),
])
def test_recalibrate_bn_takes_batches_of_one_image(sizes, merged):
    torch.manual_seed(0)
    xs = torch.randn(sum(sizes), 1, 8, 8) * 2 + 1
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    net = one_by_one_bn()
    recalibrate_bn(net, [(xs[s:s + n],) for s, n in zip(starts, sizes)])
    with torch.no_grad(): feats = net[:2](xs)
    ends = [sum(merged[:i + 1]) for i in range(len(merged))]
    expected = torch.stack([feats[e - n:e].mean((0, 2, 3)) for n, e in zip(merged, ends)]).mean(0)   # momentum=None: average of batches
    torch.testing.assert_close(net[2].running_mean, expected, atol=1e-5, rtol=1e-4)
    assert int(net[2].num_batches_tracked) == len(merged) and net.training


def test_recalibrate_bn_with_one_image_only_is_a_clear_error():
    with pytest.raises(ValueError, match="no batches of 2 images"): recalibrate_bn(one_by_one_bn(), [(torch.zeros(1, 1, 8, 8),)])


@pytest.mark.parametrize("bs", [1, 32])
def test_extract_features_and_knn_with_batches_of_one_image(digits16, bs):
    from self_supervised_swav.data import image_tensor_dls
    x, y = digits16
    dls = image_tensor_dls(x[:41], y[:41], valid_pct=0.2, bs=bs, device="cpu")      # 33 train: a last batch of one at bs=32
    enc = create_encoder("resnet10t", pretrained=False, n_in=1)     # its last stage is 1x1 on 16 px images
    feats, labels = extract_features(enc, dls.train)
    ref, _ = extract_features(enc, [(dls.train.dataset.x,)])
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(labels, dls.train.dataset.y)
    recalibrate_bn(enc, dls.train)
    assert 0 <= knn_accuracy(enc, dls.train, dls.valid) <= 1


def test_monitors_with_a_last_training_batch_of_one_and_a_bank_of_bs_1(digits16):
    "KNNMonitor (with BatchNorm recalibration) on loaders of one image per batch; SWAV skips the single-image training batch"
    from self_supervised_swav.data import image_tensor_dls
    x, y = digits16
    dls = image_tensor_dls(x[:41], y[:41], valid_pct=0.2, bs=32, device="cpu", drop_last=False)   # 33 train: 32 + 1
    mon = image_tensor_dls(x[300:330], y[300:330], valid_pct=0.3, bs=1, device="cpu")
    knn, usage = KNNMonitor(mon.train, mon.valid, recalibrate_bn=True), PrototypeUsageMonitor()
    learn = swav_learner(dls, create_encoder("resnet10t", pretrained=False, n_in=1), [knn, usage])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn.fit(1)
    assert 0 <= knn.values[0] <= 1 and int(learn.model.swav_iters) == 1
    assert usage.usage.n == 32 * 3                                      # the crops of the one trained batch only
