"""SwAV on Fashion-MNIST under a fixed CPU budget: kNN top-1 and linear-probe top-1 on the 10k test images for
(a) the SwAV-pretrained encoder, (b) the same encoder randomly initialised, (c) raw pixels.

Data: Debian's `dataset-fashion-mnist` (`apt-get install -y dataset-fashion-mnist`), the four idx .gz files in
/usr/share/datasets/fashion-mnist/. Pretraining uses the 60k training images without their labels; labels are
used only by the evaluations (and by the kNN monitor, on 6k training images).

    .venv/bin/python bench/fashion_mnist.py                  # the configuration reported in BENCHMARKS.md (~25 min, 1 CPU core)
    .venv/bin/python bench/fashion_mnist.py --val --skip_baselines --out /tmp/fm.json   # a tuning run: validation split

The defaults are that configuration: timm's resnet10t at half its widths (32-256) without the stem's max-pool
(14x14 maps in the first stage of a 28 px image), average pooling, 30 prototypes, crops 2x28 px (area 0.5-1) +
2x14 px (0.2-0.4), Adam one-cycle lr 2e-3, batch 128, no queue, 3 epochs on one torch thread. The pretrained
encoder is evaluated as trained (a) and after its BatchNorm statistics are recomputed on the full-size training
images (a', `recalibrate_bn`). On a GPU (`--device cuda`, the default when there is one) raise `--epochs`.
"""
from __future__ import annotations
import argparse, copy, gzip, json, os, platform, statistics, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException, CancelValidException
from fastai.learner import Learner
from fastai.torch_core import set_seed
import fastai.callback.progress  # noqa: F401  (progress bars and the epoch table)
import fastai.callback.schedule  # noqa: F401  (Learner.fit_one_cycle)

from self_supervised_swav.data import image_tensor_dls
from self_supervised_swav.evaluation import (KNNMonitor, PrototypeUsageMonitor, extract_features, features_knn_accuracy, knn_accuracy,
                                             linear_probe_accuracy, pipeline_normalization, recalibrate_bn)
from self_supervised_swav.layers import create_encoder
import self_supervised_swav.precision  # noqa: F401  (--bf16: Learner.to_bf16 autocasts on the learner's device, the CPU too)
from self_supervised_swav.swav import SWAV, create_swav_model, get_swav_aug_pipelines

DATA = Path("/usr/share/datasets/fashion-mnist")
STATS = ([0.2860], [0.3530])   # Fashion-MNIST training mean and std
# The configuration chosen in issue 14's second round (BENCHMARKS.md), as flags over the defaults (the first round's)
CHOSEN = ["--n_protos", "100", "--pool", "catavgmax", "--jitter_s", "0.8"]


def read_idx(path: Path) -> np.ndarray:
    "An idx file (gzip) as a numpy array"
    with gzip.open(path, "rb") as f: data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root: Path = DATA):
    "(x_train [60000, 1, 28, 28] float in [0, 1], y_train, x_test, y_test)"
    if not root.is_dir():
        raise SystemExit(f"{root} not found: apt-get update && apt-get install -y dataset-fashion-mnist")
    def images(name): return torch.from_numpy(read_idx(root / name).copy()).float().div_(255).unsqueeze(1)
    def labels(name): return torch.from_numpy(read_idx(root / name).astype(np.int64))
    return (images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz"),
            images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz"))


def evaluate(name: str, train_feats, y_train, test_feats, y_test, args) -> dict:
    "kNN top-1 (k=20, T=0.07, cosine) and linear-probe top-1 on precomputed features"
    t = time.time()
    knn = features_knn_accuracy(F.normalize(train_feats, dim=1), y_train, F.normalize(test_feats, dim=1), y_test, k=20, temp=0.07)
    probe = linear_probe_accuracy(train_feats, y_train, test_feats, y_test, epochs=args.probe_epochs, seed=args.seed)
    print(f"{name:<22} kNN top-1 {knn:.4f}   linear probe top-1 {probe:.4f}   ({time.time() - t:.0f}s)", flush=True)
    return dict(knn_top1=round(knn, 4), linear_probe_top1=round(probe, 4))


def encoder_features(encoder, x, y, tfm, bs=512):
    "Unnormalised features of all images, in order"
    dl = [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]
    return extract_features(encoder, dl, tfm=tfm, normalize=False)[0].cpu()


def build_encoder(args) -> torch.nn.Module:
    "The encoder of the settings: a timm or fastai architecture, for timm ResNets optionally narrower and without the stem's max-pool"
    kw = ({} if args.channels is None else dict(channels=tuple(args.channels), stem_width=args.channels[0] // 2)) | \
         ({} if args.output_stride == 32 else dict(output_stride=args.output_stride))   # timm ResNet options
    if not kw and not args.no_stem_pool: return create_encoder(args.arch, pretrained=False, n_in=1, pool_type=args.pool)
    import timm
    encoder = timm.create_model(args.arch, pretrained=False, num_classes=0, in_chans=1, global_pool=args.pool, **kw)
    if args.no_stem_pool: encoder.maxpool = torch.nn.Identity()   # 28 px images: keep 14x14 maps in the first stage
    return encoder


def apply_auto(args, n_train: int):
    "The settings `swav_pretrain` chooses by default (the library's `resolve_auto`, 10 classes) instead of the hand-tuned ones"
    from self_supervised_swav.config import PretrainConfig, resolve_auto
    config, why = resolve_auto(PretrainConfig(bs=args.bs, epochs=args.epochs, opt="adam"), n_train, n_classes=10)
    for name in ("n_protos", "K", "queue_start_pct", "freeze_protos_iters", "lr", "wd", "eps"): setattr(args, name, getattr(config, name))
    args.auto_reasons = {name: why[name] for name in ("n_protos", "K", "freeze_protos_iters", "lr", "wd", "eps")}
    print("auto settings:", {k: getattr(args, k) for k in args.auto_reasons}, flush=True)


def main(args):
    torch.set_num_threads(args.threads)
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    if args.val: (x_train, y_train), (x_test, y_test) = (x_train[:-10000], y_train[:-10000]), (x_train[-10000:], y_train[-10000:])
    x_train, y_train = x_train[:args.n_train], y_train[:args.n_train]
    if args.auto: apply_auto(args, int(0.98 * len(x_train)))
    results = dict(command="python bench/fashion_mnist.py " + " ".join(args.argv), settings=vars(args) | dict(argv=None),
                   machine=dict(cpu_threads=torch.get_num_threads(), cpus=os.cpu_count(), platform=platform.platform(),
                                torch=torch.__version__))
    results["settings"].pop("argv")

    set_seed(args.seed)
    augs = get_swav_aug_pipelines(num_crops=args.num_crops, crop_sizes=args.crop_sizes, min_scales=args.min_scales,
                                  max_scales=args.max_scales, stats=STATS, jitter_s=args.jitter_s, blur=False)
    tfm = pipeline_normalization(augs)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results["machine"]["device"] = str(device)
    encoder = build_encoder(args).to(device)

    if not args.skip_baselines:
        print("== evaluation of the baselines", flush=True)
        results["raw_pixels"] = evaluate("(c) raw pixels", x_train.flatten(1), y_train, x_test.flatten(1), y_test, args)
        results["random_encoder"] = evaluate("(b) random encoder", encoder_features(encoder, x_train, y_train, tfm), y_train,
                                             encoder_features(encoder, x_test, y_test, tfm), y_test, args)

    print(f"== SwAV pretraining: {args.arch} (channels {args.channels}, stem max-pool {not args.no_stem_pool}), {args.epochs} epochs on {len(x_train)} unlabelled images", flush=True)
    # labels are not used by SwAV: the pretraining DataLoaders get zeros (fastai needs a target to compute a loss)
    dls = image_tensor_dls(x_train, torch.zeros(len(x_train), dtype=torch.long), valid_pct=0.02, bs=args.bs, device=device, num_workers=0)
    mon = image_tensor_dls(x_train[:6000], y_train[:6000], valid_pct=1/6, bs=1000, device=device, num_workers=0)
    model = create_swav_model(encoder, hidden_size=args.hidden_size, projection_size=args.projection_size, n_protos=args.n_protos)
    swav = SWAV(augs, crop_assgn_ids=[0, 1], K=args.K or None, queue_start_pct=args.queue_start_pct, temp=args.temp,
                eps=args.eps, freeze_protos_iters=args.freeze_protos_iters)
    if args.time_steps:
        results["step_speed"] = step_speed(dls, model.to(device), augs, args)
        write_results(results, args.out)
        return results
    learn = Learner(dls, model.to(device), cbs=[swav, KNNMonitor(mon.train, mon.valid), PrototypeUsageMonitor()], wd=args.wd)
    if args.bf16: learn.to_bf16()   # bfloat16 autocast on the learner's device (the CPU too: self_supervised_swav.precision)
    if args.minutes: args.epochs = results["epochs_in_budget"] = epochs_in(args.minutes, learn, dls, mon, augs, args)
    t, cpu = time.time(), time.process_time()
    learn.fit_one_cycle(args.epochs, args.lr)
    results["pretraining_seconds"] = round(time.time() - t)
    results["pretraining_cpu_seconds"] = round(time.process_time() - cpu)   # all threads of this process
    results["pretraining_log"] = [dict(zip(learn.recorder.metric_names[1:-1], map(lambda v: None if v is None else round(float(v), 4), vals)))
                                  for vals in learn.recorder.values]
    print(f"pretraining took {results['pretraining_seconds']}s ({results['pretraining_cpu_seconds']}s of CPU time)", flush=True)

    print("== evaluation of the pretrained encoder", flush=True)
    results["pretrained_encoder"] = evaluate("(a) SwAV-pretrained", encoder_features(encoder, x_train, y_train, tfm), y_train,
                                             encoder_features(encoder, x_test, y_test, tfm), y_test, args)
    if args.bn_recal:
        n = args.bn_recal
        recalibrate_bn(encoder, [(x_train[i:i + 512],) for i in range(0, min(n, len(x_train)), 512)], tfm)
        results["pretrained_encoder_bn_recalibrated"] = evaluate("(a') BN recalibrated", encoder_features(encoder, x_train, y_train, tfm), y_train,
                                                                 encoder_features(encoder, x_test, y_test, tfm), y_test, args)
    if args.save_encoder:
        from self_supervised_swav.modelfile import save_encoder
        save_encoder(encoder, args.save_encoder, arch=args.arch, n_in=1)
    write_results(results, args.out)
    return results


class BatchTimer(Callback):
    "Ends the fit after `n` training batches, without validation; `times`: the seconds of each, from the end of the previous"
    order = 100
    def __init__(self, n: int = 1): self.n = n
    def before_fit(self): self.times, self.t = [], time.perf_counter()
    def after_batch(self):
        t = time.perf_counter(); self.times.append(t - self.t); self.t = t
        if len(self.times) >= self.n: raise CancelFitException()
    def before_validate(self): raise CancelValidException()


class Steps:
    "A harness contender: `run(n)` fits `n` batches of a copy of the run's model, in float32 or bf16, and returns their seconds"
    def __init__(self, name: str, dls, model, augs, args, bf16: bool):
        self.name, self.lr, self.timer = name, args.lr, BatchTimer()
        swav = SWAV(augs, crop_assgn_ids=[0, 1], K=args.K or None, queue_start_pct=args.queue_start_pct, temp=args.temp,
                    eps=args.eps, freeze_protos_iters=args.freeze_protos_iters)
        self.learn = Learner(dls, copy.deepcopy(model), cbs=[swav, self.timer], wd=args.wd)
        if bf16: self.learn.to_bf16()
    def run(self, n: int) -> list[float]:
        self.timer.n = n
        with self.learn.no_bar(), self.learn.no_logging(): self.learn.fit(1, self.lr)
        return self.timer.times


def epochs_in(minutes: float, learn, dls, mon, augs, args, n: int = 12, warmup: int = 3) -> int:
    "The epochs that fit in `minutes`, from `n` timed training batches of a copy of the run (after `warmup`) and its monitor's kNN"
    trial, rng = Steps("trial", dls, learn.model, augs, args, args.bf16), torch.get_rng_state()
    batch_s = statistics.median(trial.run(n + warmup)[warmup:])
    torch.set_rng_state(rng)
    t = time.perf_counter(); knn_accuracy(trial.learn.model.encoder, mon.train, mon.valid, tfm=pipeline_normalization(augs))
    epoch_s = batch_s * len(dls.train) + (time.perf_counter() - t) + 5
    epochs = max(1, int(minutes * 60 // epoch_s))
    print(f"budget {minutes} min: {batch_s:.3f} s per batch, about {epoch_s:.0f} s per epoch: {epochs} epochs", flush=True)
    return epochs


def step_speed(dls, model, augs, args) -> dict:
    "Step times of the run's model in float32 and bf16, interleaved (`harness.run_interleaved`), and the bf16 speed-up"
    import harness as H
    steps = [Steps(name, dls, model, augs, args, bf16=name == "bf16") for name in ("fp32", "bf16")]
    times = H.run_interleaved(steps, args.rounds, args.time_steps, warmup=1)
    res = {name: dict(step_ms=round(H.median_ms(H.flat(r)), 1), spread_pct=round(H.spread_pct(H.flat(r)))) for name, r in times.items()}
    res["bf16_speedup"] = round(1 / H.paired_ratio(times["bf16"], times["fp32"]), 3)
    print(f"step (batch {args.bs}, {torch.get_num_threads()} threads, median of {args.time_steps} steps x {args.rounds} interleaved rounds): "
          f"float32 {res['fp32']['step_ms']:.0f} ms, bf16 {res['bf16']['step_ms']:.0f} ms, bf16 speed-up {res['bf16_speedup']:.2f}x", flush=True)
    return res


def write_results(results: dict, out: str):
    "`results` as JSON in the file `out` (its folder made; nothing when `out` is empty)"
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1))
        print(f"wrote {out}")


def add_training_args(p: argparse.ArgumentParser):
    "The pretraining options this benchmark shares with `bench_clusters.py`, with their defaults"
    p.add_argument("--bs", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--wd", type=float, default=1e-2)
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--projection_size", type=int, default=128)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--temp", type=float, default=0.1)
    p.add_argument("--freeze_protos_iters", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine, 2 threads spin and run slower)")
    p.add_argument("--device", default=None, help="cpu or cuda; default: cuda when there is a GPU")
    p.add_argument("--seed", type=int, default=0)


def add_encoder_args(p: argparse.ArgumentParser):
    "The options of `build_encoder`, shared with `semi_supervised.py`"
    p.add_argument("--arch", default="resnet10t")
    p.add_argument("--channels", type=int, nargs=4, default=[32, 64, 128, 256], help="widths of the 4 stages of a timm ResNet (resnet10t: 64 128 256 512)")
    p.add_argument("--stem_pool", dest="no_stem_pool", action="store_false", help="keep the max-pool of the stem (timm's resnet10t as it is)")
    p.add_argument("--no_stem_pool", action="store_true", default=True, help="drop the max-pool of a timm ResNet's stem (finer feature maps)")
    p.add_argument("--output_stride", type=int, default=32, choices=(8, 16, 32), help="timm ResNet output stride with its stem max-pool "
                   "(halved without it); 16: the last stage dilated instead of strided (4x4 maps at 28 px without the stem max-pool)")
    p.add_argument("--pool", default="avg", help="global pooling (avg, catavgmax: the library's default, ...); at 28 px the last map is 1x1 with the stem max-pool "
                   "(both give the same features) and 2x2 without it")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p)
    add_encoder_args(p)
    p.add_argument("--bn_recal", type=int, default=60000, help="also evaluate after recomputing BatchNorm statistics on this many full-size training images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--minutes", type=float, default=0, help="instead of --epochs: the epochs that fit in this many minutes of pretraining, "
                   "estimated from a few timed batches before the run (on a shared machine the load may change after)")
    p.add_argument("--time_steps", type=int, default=0, help="only time the training step: this many steps per round, float32 and bf16 "
                   "interleaved (--rounds rounds), and print the bf16 speed-up; no pretraining")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds of --time_steps")
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (learn.to_bf16(): autocast on the CPU too)")
    p.add_argument("--num_crops", type=int, nargs="+", default=[2, 2])
    p.add_argument("--crop_sizes", type=int, nargs="+", default=[28, 14])
    p.add_argument("--min_scales", type=float, nargs="+", default=[0.5, 0.2])
    p.add_argument("--max_scales", type=float, nargs="+", default=[1.0, 0.4])
    p.add_argument("--jitter_s", type=float, default=0.5)
    p.add_argument("--n_protos", type=int, default=30)
    p.add_argument("--K", type=int, default=0, help="queue length; 0: no queue")
    p.add_argument("--queue_start_pct", type=float, default=0.25)
    p.add_argument("--n_train", type=int, default=60000)
    p.add_argument("--probe_epochs", type=int, default=20)
    p.add_argument("--val", action="store_true", help="tune on a validation split: pretrain on the first 50k training images "
                   "(the kNN bank) and evaluate on the last 10k as queries; the test images are not used")
    p.add_argument("--skip_baselines", action="store_true", help="evaluate only the pretrained encoder (for tuning runs)")
    p.add_argument("--auto", action="store_true", help="the settings swav_pretrain chooses by default (suggest_swav_settings) instead of the tuned ones")
    p.add_argument("--save_encoder", default="", help="also write the pretrained encoder's weights to this file")
    p.add_argument("--out", default="bench/fashion_mnist.json")
    import sys
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.argv = argv
    return args


if __name__ == "__main__":
    main(parse())
