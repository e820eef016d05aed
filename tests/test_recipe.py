"Training recipe: official LARS step, warm-up + cosine schedule, suggested settings, plots, plain-line progress."
import io
import math
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
from torch import nn
from fastai.callback.progress import CSVLogger, ProgressCallback
from fastai.data.core import DataLoaders
from fastai.learner import Learner

from helpers import Interrupt, digits_dls
from self_supervised_swav.evaluation import KNNMonitor, PrototypeUsageMonitor
from self_supervised_swav.checks import SettingError
from self_supervised_swav.plots import plot_run, run_history
from self_supervised_swav.progress import LineProgress, use_line_progress
from self_supervised_swav.recipe import swav_opt_func, swav_optimizer, warmup_cosine_sched
from self_supervised_swav.suggest import suggest_swav_settings
from self_supervised_swav.swav import SWAV, create_swav_model, get_swav_aug_pipelines


# ---- LARS: the official rule (apex LARC clip=False + torch.optim.SGD momentum), computed independently

def official_larc_sgd(params, grads, bufs, lr, wd, mom, tc, eps=1e-8):
    "One step of torch.optim.SGD(momentum=mom, weight_decay=wd) wrapped in apex LARC(trust_coefficient=tc, clip=False)"
    out, new_bufs = [], []
    for w, g, buf in zip(params, grads, bufs):
        g = g.clone()
        w_norm, g_norm = torch.norm(w), torch.norm(g)
        if w_norm != 0 and g_norm != 0:
            adaptive_lr = tc * w_norm / (g_norm + w_norm * wd + eps)
            g = (g + wd * w) * adaptive_lr
        buf = g.clone() if buf is None else buf * mom + g
        out.append(w - lr * buf); new_bufs.append(buf)
    return out, new_bufs


def plain_sgd(w, g, buf, lr, mom):
    buf = g.clone() if buf is None else buf * mom + g
    return w - lr * buf, buf


@pytest.mark.parametrize("momentum", [0.9, 0.])
def test_lars_matches_official_step_bias_excluded(momentum):
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    lr, wd, tc = 2.0, 0.05, 0.001
    opt = swav_opt_func("lars", momentum=momentum, wd=wd, trust_coeff=tc)([list(lin.parameters())], lr=lr)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    wbuf = bbuf = None
    for _ in range(3):
        lin.zero_grad(); ((lin(x) - y) ** 2).mean().backward()
        gw, gb = lin.weight.grad.clone(), lin.bias.grad.clone()
        opt.step()
        (w,), (wbuf,) = official_larc_sgd([w], [gw], [wbuf], lr, wd, momentum, tc)
        b, bbuf = plain_sgd(b, gb, bbuf, lr, momentum)   # 1-d: no LARS adaptation, no weight decay
        torch.testing.assert_close(lin.weight.detach(), w, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(lin.bias.detach(), b, rtol=1e-6, atol=1e-7)


def test_lars_hand_computed_numbers():
    "One step on a 2x2 weight, the numbers worked out by hand"
    w = nn.Parameter(torch.tensor([[3., 0.], [0., 4.]]))      # |w| = 5
    w.grad = torch.tensor([[0., 0.], [0., 1.]])               # |g| = 1
    opt = swav_optimizer([w], lr=10., opt="lars", momentum=0.9, wd=0.1, trust_coeff=0.01)
    opt.step()
    local = 0.01 * 5 / (1 + 0.1 * 5 + 1e-8)                   # 1/30
    expected = torch.tensor([[3., 0.], [0., 4.]]) - 10. * local * (torch.tensor([[0., 0.], [0., 1.]]) + 0.1 * torch.tensor([[3., 0.], [0., 4.]]))
    torch.testing.assert_close(w.detach(), expected)
    torch.testing.assert_close(w.detach(), torch.tensor([[2.9, 0.], [0., 4 - 14 / 30]]))


def test_lars_zero_grad_or_weight_left_alone():
    "Official: a zero norm (weight or gradient) leaves the gradient as it is, no weight decay added"
    w = nn.Parameter(torch.ones(2, 2)); w.grad = torch.zeros(2, 2)
    swav_optimizer([w], lr=1., opt="lars", wd=0.5, momentum=0.).step()
    torch.testing.assert_close(w.detach(), torch.ones(2, 2))
    z = nn.Parameter(torch.zeros(2, 2)); z.grad = torch.ones(2, 2)
    swav_optimizer([z], lr=0.1, opt="lars", wd=0.5, momentum=0.).step()
    torch.testing.assert_close(z.detach(), torch.full((2, 2), -0.1))


def test_sgd_and_adam_exclude_1d_from_weight_decay():
    for opt_name in ("sgd", "adam"):
        lin = nn.Linear(2, 2)
        w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
        opt = swav_optimizer(list(lin.parameters()), lr=0.1, opt=opt_name, wd=0.5)
        for p in lin.parameters(): p.grad = torch.zeros_like(p)
        opt.step()
        torch.testing.assert_close(lin.bias.detach(), b0)                        # no decay on the bias
        assert not torch.allclose(lin.weight.detach(), w0), opt_name             # decay on the weight


def test_do_wd_false_from_learner_is_respected(tiny_dls):
    "Learner(wd_bn_bias=False) marks BatchNorm/bias params do_wd=False: the optimizer leaves them out too"
    model = nn.Sequential(nn.Flatten(), nn.Linear(24 * 24, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))
    learn = Learner(tiny_dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=swav_opt_func("lars"))
    learn.create_opt()
    bn_w = model[2].weight
    assert learn.opt.state[bn_w].get("do_wd") is False


@pytest.mark.parametrize("bad,msg", [(dict(opt="lamb"), "opt must be one of"), (dict(momentum=1.0), "momentum must be a number in [0, 1)"),
                                     (dict(wd=-1e-6), "wd must be a number >= 0"), (dict(trust_coeff=0), "trust_coeff must be a positive number")])
def test_opt_func_bad_values(bad, msg):
    "Each bad option is a `SettingError` naming it (what `swav_pretrain --momentum 1.5` prints as one line)"
    with pytest.raises(SettingError) as e: swav_opt_func(**bad)
    assert msg in str(e.value) and e.value.param == next(iter(bad))


# ---- schedule

def official_schedule(base_lr, final_lr, epochs, n_per_epoch, warmup_epochs, start_warmup=0.):
    "main_swav.py's lr_schedule array"
    warm = np.linspace(start_warmup, base_lr, n_per_epoch * warmup_epochs)
    iters = np.arange(n_per_epoch * (epochs - warmup_epochs))
    cos = np.array([final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * t / (n_per_epoch * (epochs - warmup_epochs)))) for t in iters])
    return np.concatenate((warm, cos))


@pytest.mark.parametrize("epochs,n,warm,start", [(100, 313, 10, 0.), (4, 5, 1, 0.3), (3, 7, 0, 0.), (5, 1, 1, 0.)])
def test_schedule_matches_official_array(epochs, n, warm, start):
    ref = official_schedule(4.8, 0.0048, epochs, n, warm, start)
    sched = warmup_cosine_sched(4.8, 0.0048, warm / epochs, start, n_iter=epochs * n)
    np.testing.assert_allclose([sched(it / (epochs * n)) for it in range(epochs * n)], ref, rtol=1e-12, atol=1e-12)


def test_schedule_by_hand():
    "A few values of the official formula computed by hand: 2 warm-up iterations, then 8 cosine ones"
    s = warmup_cosine_sched(1., 0.1, warmup_pct=0.2, n_iter=10)
    assert s(0.) == 0. and s(0.1) == 1.                       # linspace(0, 1, 2)
    assert math.isclose(s(0.2), 1.)                           # t = 0
    assert math.isclose(s(0.6), 0.1 + 0.45 * (1 + math.cos(math.pi * 4 / 8)))   # t = 4: 0.55
    assert math.isclose(s(0.6), 0.55)


def test_schedule_bad_values():
    for kw, msg in [(dict(warmup_pct=1.), "warmup_pct must be in [0, 1)"), (dict(final_lr=-1.), "final_lr must be a number >= 0"),
                    (dict(n_iter=0), "n_iter must be an int > 0")]:
        with pytest.raises(SettingError) as e: warmup_cosine_sched(1., **kw)
        assert msg in str(e.value) and e.value.param == next(iter(kw))


def regression_learner(path, opt="lars"):
    torch.manual_seed(0)
    x = torch.randn(40, 3); y = x @ torch.tensor([[1.], [-2.], [0.5]])
    ds = list(zip(x, y))
    dls = DataLoaders.from_dsets(ds[:30], ds[30:], bs=6, shuffle=False, device="cpu", num_workers=0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    return Learner(dls, model, loss_func=nn.MSELoss(), opt_func=swav_opt_func(opt), path=path)


@pytest.mark.parametrize("opt", ["lars", "adam"])
def test_fit_warmup_cosine_lrs_and_resume(tmp_path, opt):
    full = regression_learner(tmp_path, opt)
    with full.no_bar(), full.no_logging(): full.fit_warmup_cosine(4, lr=0.5, warmup_epochs=1, start_warmup=0.1)
    np.testing.assert_allclose(full.recorder.lrs, official_schedule(0.5, 0.0005, 4, 5, 1, 0.1), rtol=1e-9)
    first = regression_learner(tmp_path, opt)
    with first.no_bar(), first.no_logging(): first.fit_warmup_cosine(4, lr=0.5, warmup_epochs=1, start_warmup=0.1, cbs=Interrupt(2))
    first.save("half", with_opt=True)
    resumed = regression_learner(tmp_path, opt)
    resumed.load("half", with_opt=True)
    assert len(resumed.opt.state) > 0   # the momentum buffers came back
    with resumed.no_bar(), resumed.no_logging(): resumed.fit_warmup_cosine(4, lr=0.5, warmup_epochs=1, start_warmup=0.1, start_epoch=2)
    np.testing.assert_allclose(resumed.recorder.lrs, full.recorder.lrs[10:], rtol=1e-9)
    for a, b in zip(resumed.model.parameters(), full.model.parameters()): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fit_warmup_cosine_bad_values(tmp_path):
    learn = regression_learner(tmp_path)
    for kw, msg in [(dict(n_epoch=3, warmup_epochs=3), "warmup_epochs must be an int in [0, n_epoch) = [0, 3), got 3"),
                    (dict(n_epoch=0), "n_epoch must be an int > 0"), (dict(n_epoch=2, lr=-1.), "base_lr must be a number >= 0")]:
        with pytest.raises(SettingError) as e: learn.fit_warmup_cosine(**kw)
        assert msg in str(e.value)
    with pytest.raises(TypeError, match="lr must be a number"): learn.fit_warmup_cosine(2, lr=slice(1e-3, 1e-2))


# ---- settings

def values(d): return {k: v for k, (v, _) in d.items()}


def test_settings_reproduce_official_configs():
    big = values(suggest_swav_settings(1_281_167, 4096, 800, n_classes=1000, opt="lars"))
    assert (big["n_protos"], big["K"], big["warmup_epochs"], big["wd"], big["eps"]) == (3000, 0, 10, 1e-6, 0.05)
    assert math.isclose(big["lr"], 4.8) and math.isclose(big["final_lr"], 0.0048)
    small = values(suggest_swav_settings(1_281_167, 256, 400, opt="lars"))
    assert (small["n_protos"], small["K"], small["warmup_epochs"]) == (3000, 3840, 0)
    assert math.isclose(small["lr"], 0.6) and math.isclose(small["queue_start_pct"], 15 / 400)
    # frozen prototypes: the official configs' freeze_prototypes_niters, 313 at batch 4096 and 5005 at batch 256, which
    # are ceil(1281167 / bs): one epoch as they count it
    assert (big["freeze_protos_iters"], small["freeze_protos_iters"]) == (313, 5005)


def test_settings_project_measurements():
    fm = suggest_swav_settings(60_000, 128, 3, n_classes=10)
    assert values(fm)["n_protos"] == 32 and values(fm)["K"] == 0 and values(fm)["lr"] == 2e-3 and values(fm)["wd"] == 0.01
    d = values(suggest_swav_settings(1437, 64, 6, n_classes=10))
    assert d["K"] == 0 and d["freeze_protos_iters"] == 23 and d["lr"] == 1e-3 and 2 <= d["n_protos"] <= 20
    for name, (v, reason) in fm.items(): assert isinstance(reason, str) and reason and "\n" not in reason, name


def test_settings_rules():
    long_small = values(suggest_swav_settings(50_000, 64, 200))
    assert long_small["K"] > 0 and long_small["K"] % 64 == 0 and long_small["K"] <= 5000
    assert math.isclose(long_small["queue_start_pct"], 15 / 200)
    assert values(suggest_swav_settings(50_000, 512, 200))["K"] == 0          # large batch: no queue
    assert values(suggest_swav_settings(50_000, 64, 20))["K"] == 0            # short training: no queue
    assert values(suggest_swav_settings(300, 64, 200))["K"] == 0              # queue would be > a tenth of the data
    n = values(suggest_swav_settings(50_000, 64, 5))["n_protos"]
    assert n == 16                                                          # a quarter of the batch without a queue
    lars = [values(suggest_swav_settings(100_000, bs, 10, opt="lars"))["lr"] for bs in (64, 256, 1024)]
    assert lars == sorted(lars)                                             # grows with the batch
    assert values(suggest_swav_settings(100_000, 1024, 100, opt="lars"))["warmup_epochs"] == 10
    assert values(suggest_swav_settings(100_000, 1024, 5, opt="sgd"))["warmup_epochs"] == 0


@pytest.mark.parametrize("n_images,bs,epochs", [(10, 4, 3), (10, 10, 1), (1, 1, 1), (12, 3, 100)])
def test_settings_tiny_data_is_sensible(n_images, bs, epochs):
    s = values(suggest_swav_settings(n_images, bs, epochs, n_classes=3))
    iters = n_images // bs * epochs
    assert s["n_protos"] >= 2 and s["K"] == 0 and 0 <= s["freeze_protos_iters"] < max(iters, 1)
    assert s["lr"] > 0 and 0 <= s["warmup_epochs"] < epochs


@pytest.mark.parametrize("args,kw,msg", [
    ((10, 64, 5), {}, "global_bs 64 is larger than n_images 10"),
    ((10, 64, 5), {}, "pass global_bs=5 or less"),
    ((0, 1, 1), {}, "n_images must be an int > 0, got 0"),
    ((100, 1.5, 1), {}, "global_bs must be an int > 0, got 1.5"),
    ((100, 10, -1), {}, "epochs must be an int > 0, got -1"),
    ((100, 10, 1), dict(n_classes=0), "n_classes must be an int > 0"),
    ((100, 10, 1), dict(opt="rmsprop"), "opt must be one of"),
])
def test_settings_bad_inputs(args, kw, msg):
    with pytest.raises(SettingError) as e: suggest_swav_settings(*args, **kw)
    assert msg in str(e.value)


# ---- plots and progress

@pytest.fixture(scope="module")
def swav_run(digits, tmp_path_factory):
    "(Learner, printed output, folder) of one short SwAV run on 150 digits (3 training batches an epoch): LARS, warm-up + cosine, monitors, CSVLogger, LineProgress"
    torch.manual_seed(0)
    tmp_path = tmp_path_factory.mktemp("swav_run")
    dls = digits_dls(digits, 150, 32)
    encoder = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    augs = get_swav_aug_pipelines(num_crops=[2, 1], crop_sizes=[16, 8], min_scales=[0.3, 0.1], max_scales=[1., 0.4], stats=([0.45], [0.25]))
    learn = Learner(dls, create_swav_model(encoder, hidden_size=16, projection_size=8, n_protos=10), path=tmp_path,
                    opt_func=swav_opt_func("lars"),
                    cbs=[SWAV(augs, crop_assgn_ids=[0, 1], K=None, freeze_protos_iters=1), PrototypeUsageMonitor(),
                         KNNMonitor(dls.train, dls.valid), CSVLogger()])
    buf = io.StringIO()
    with redirect_stdout(buf):
        use_line_progress(learn, every=2, force=True)
        learn.fit_warmup_cosine(2, lr=0.6, warmup_epochs=1)
    return learn, buf.getvalue(), tmp_path


def test_plots_and_csv_written(swav_run, tmp_path):
    learn, out, run_dir = swav_run
    csv_path = run_dir / "history.csv"
    assert csv_path.stat().st_size > 0 and len(csv_path.read_text().splitlines()) == 3
    paths = plot_run(learn, tmp_path / "plots", n_protos=10, knn_random=0.4)
    assert [p.name for p in paths] == ["loss.png", "knn.png", "prototypes.png", "lr.png"]
    for p in paths: assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    from_csv = plot_run(csv_path, tmp_path / "csv_plots", n_protos=10)
    assert [p.name for p in from_csv] == ["loss.png", "knn.png", "prototypes.png"]
    h = run_history(csv_path)
    assert set(["train_loss", "valid_loss", "knn_top1", "protos_used", "assign_entropy"]) <= set(h["cols"])
    np.testing.assert_allclose(h["cols"]["train_loss"], run_history(learn)["cols"]["train_loss"], rtol=1e-5)


def test_plot_run_csv_without_metrics_and_bad_input(tmp_path):
    p = tmp_path / "history.csv"
    p.write_text("epoch,train_loss,valid_loss,time\n0,2.3,2.2,00:01\n1,2.0,2.1,00:01\n")
    assert [q.name for q in plot_run(p, tmp_path / "o", n_protos=10)] == ["loss.png"]
    with pytest.raises(ValueError, match="no CSV log at"): plot_run(tmp_path / "nope.csv", tmp_path, 10)
    with pytest.raises(ValueError, match="n_protos must be an int > 0"): plot_run(p, tmp_path, 0)
    with pytest.raises(TypeError, match="must be a Learner or the path"): plot_run(42, tmp_path, 10)
    bad = tmp_path / "bad.csv"; bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a CSVLogger history"): plot_run(bad, tmp_path, 10)


def test_line_progress_has_no_carriage_returns(swav_run):
    learn, out, run_dir = swav_run
    assert "\r" not in out and "\x1b" not in out
    epoch_lines = [l for l in out.splitlines() if l.startswith("epoch ") and ": train_loss" in l]
    assert len(epoch_lines) == 2 and "knn_top1" in epoch_lines[0] and "protos_used" in epoch_lines[0]
    assert sum(" iter 2/3: smooth_loss " in l for l in out.splitlines()) == 2   # every=2 on 3-iteration epochs
    assert (run_dir / "history.csv").read_text().count("\n") == 3   # CSVLogger still gets each epoch


def test_line_progress_refuses_to_run_with_bars(tmp_path):
    learn = regression_learner(tmp_path)
    learn.add_cb(ProgressCallback()) if not any(isinstance(c, ProgressCallback) for c in learn.cbs) else None
    with pytest.raises(ValueError, match="use_line_progress"): learn.fit(1, cbs=LineProgress())
    with pytest.raises(ValueError, match="every must be a positive int"): LineProgress(every=0)


def test_use_line_progress_keeps_bars_in_a_terminal(tmp_path, monkeypatch):
    learn = regression_learner(tmp_path)
    learn.add_cb(ProgressCallback())
    monkeypatch.setattr("sys.stdout.isatty", lambda: True, raising=False)
    assert use_line_progress(learn) is False and any(isinstance(c, ProgressCallback) for c in learn.cbs)
    monkeypatch.setattr("sys.stdout.isatty", lambda: False, raising=False)
    assert use_line_progress(learn) is True
    assert not any(isinstance(c, ProgressCallback) for c in learn.cbs) and any(isinstance(c, LineProgress) for c in learn.cbs)
