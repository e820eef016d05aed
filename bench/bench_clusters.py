"""What SwAV's prototypes are worth as clusters, on Fashion-MNIST (issue 13): NMI, ARI and purity on the 10k test
images of

    (a) the SwAV prototypes, plain (argmax) and balanced (Sinkhorn-Knopp over the 10k images), no k-means;
    (b) k-means (k = number of prototypes) on the SwAV encoder's features;
    (c) k-means on raw pixels;
    (d) k-means on the features of the same encoder randomly initialised.

Pretraining is the quality benchmark's (`bench/fashion_mnist.py`: resnet10t at half width without the stem's max-pool,
crops 2x28 + 2x14 px, batch 128, Adam one-cycle lr 2e-3, no queue, 3 epochs), once per `--n_protos`, under a time
budget: `--minutes` of pretraining each, the number of training images (at most 60k) chosen from the measured time
of a few steps so that the 3 epochs fit. k-means is scikit-learn's `KMeans(n_init=3)`.

    .venv/bin/python bench/bench_clusters.py                                # 10 and 30 prototypes, 20 min each, 1 thread
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_clusters.py --minutes 1 --n_protos 10 --out /tmp/clusters.json   # a check

Data: Debian's `dataset-fashion-mnist` (`apt-get install -y dataset-fashion-mnist`), read by `bench/fashion_mnist.py`.
"""
from __future__ import annotations
import argparse, copy, os, platform, sys, time

import torch
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.torch_core import set_seed
import fastai.callback.progress  # noqa: F401  progress bars
import fastai.callback.schedule  # noqa: F401  fit_one_cycle
from sklearn.cluster import KMeans

import fashion_mnist as fm   # the quality benchmark's data loader and encoder

from self_supervised_swav.clusters import cluster_stats, embed_images, prototype_assignments
from self_supervised_swav.data import image_tensor_dls
from self_supervised_swav.evaluation import extract_features, pipeline_normalization, recalibrate_bn
from self_supervised_swav.swav import SWAV, create_swav_model, get_swav_aug_pipelines


def quality(name: str, assignments, labels, n_protos: int) -> dict:
    "NMI, ARI, purity and the prototypes used, printed as a table row"
    s = cluster_stats(torch.as_tensor(assignments), n_protos, labels=labels)
    row = dict(nmi=round(s.nmi, 4), ari=round(s.ari, 4), purity=round(s.purity, 4), used=n_protos - s.n_empty,
               largest=max(s.sizes))
    print(f"| {name} | {n_protos} | {row['nmi']:.4f} | {row['ari']:.4f} | {row['purity']:.4f} | {row['used']} | {row['largest']} |", flush=True)
    return row


def kmeans(feats: torch.Tensor, k: int, seed: int):
    return KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(feats.numpy())


def features(encoder, x, tfm, bs=512) -> torch.Tensor:
    "L2-normalised encoder features of all images, on the CPU"
    return extract_features(encoder, [(x[i:i + bs],) for i in range(0, len(x), bs)], tfm=tfm)[0].cpu()


def learner(args, encoder, x, n_protos: int, augs, device) -> Learner:
    dls = image_tensor_dls(x, torch.zeros(len(x), dtype=torch.long), valid_pct=0.02, bs=args.bs, device=device, num_workers=0)
    model = create_swav_model(encoder, hidden_size=args.hidden_size, projection_size=args.projection_size, n_protos=n_protos)
    swav = SWAV(augs, crop_assgn_ids=[0, 1], K=None, temp=args.temp, eps=args.eps, freeze_protos_iters=args.freeze_protos_iters)
    return Learner(dls, model.to(device), cbs=[swav], wd=args.wd)


def n_train_for(args, encoder, x, n_protos, augs, device) -> tuple[int, float]:
    "(training images whose `args.epochs` epochs fit in `args.minutes`, seconds per step) from a few timed steps of a copy"
    n_steps = 6
    learn = learner(args, copy.deepcopy(encoder), x[:args.bs * n_steps], n_protos, augs, device)
    times = []
    class Timer(Callback):
        def before_batch(self): self.t = time.perf_counter()
        def after_batch(self): times.append(time.perf_counter() - self.t)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, args.lr, cbs=Timer())
    step = sum(times[2:]) / len(times[2:])                  # the first steps warm up
    steps = args.minutes * 60 / step / args.epochs
    return max(args.bs, min(len(x), int(steps) * args.bs)), step


def pretrain(args, encoder, x_train, n_protos, augs, tfm, device):
    "SwAV model pretrained within the time budget, with the seconds it took and the images it saw"
    n, step = n_train_for(args, encoder, x_train, n_protos, augs, device)
    print(f"== {n_protos} prototypes: {step:.3f}s per step, so {args.epochs} epochs of {n} images for {args.minutes} min", flush=True)
    set_seed(args.seed)
    learn = learner(args, encoder, x_train[:n], n_protos, augs, device)
    t = time.time()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(args.epochs, args.lr)
    seconds = round(time.time() - t)
    print(f"pretrained in {seconds}s, train loss by epoch {[round(float(v[0]), 3) for v in learn.recorder.values]}", flush=True)
    if args.bn_recal:
        recalibrate_bn(encoder, [(x_train[i:i + 512],) for i in range(0, min(args.bn_recal, len(x_train)), 512)], tfm)
    return learn.model.eval(), seconds, n


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x_train, _, x_test, y_test = fm.load_fashion_mnist()
    if args.tiny: x_train, x_test, y_test = x_train[:1536], x_test[:600], y_test[:600]
    fm_args = fm.parse([])                     # the quality benchmark's encoder settings
    set_seed(args.seed)
    augs = get_swav_aug_pipelines(num_crops=fm_args.num_crops, crop_sizes=fm_args.crop_sizes, min_scales=fm_args.min_scales,
                                  max_scales=fm_args.max_scales, stats=fm.STATS, jitter_s=fm_args.jitter_s, blur=False)
    tfm = pipeline_normalization(augs)
    results = dict(command="python bench/bench_clusters.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   settings=vars(args), machine=dict(threads=torch.get_num_threads(), cpus=os.cpu_count(), device=str(device),
                                                     platform=platform.platform(), torch=torch.__version__), runs={})
    print("| clustering | k | NMI | ARI | purity | clusters used | largest |\n|---|---|---|---|---|---|---|")
    pixels = x_test.flatten(1)
    for k in args.n_protos:
        run = results["runs"][str(k)] = {}
        run["raw_pixels_kmeans"] = quality("(c) k-means on raw pixels", kmeans(pixels, k, args.seed), y_test, k)
        set_seed(args.seed)
        encoder = fm.build_encoder(fm_args).to(device)
        run["random_encoder_kmeans"] = quality("(d) k-means on random encoder features", kmeans(features(encoder, x_test, tfm), k, args.seed), y_test, k)
        model, run["pretraining_seconds"], run["pretraining_images"] = pretrain(args, encoder, x_train, k, augs, tfm, device)
        z, _ = embed_images(model, [(x_test[i:i + 512],) for i in range(0, len(x_test), 512)], tfm=tfm)
        w = model.prototypes.weight.detach().cpu()
        run["prototypes_plain"] = quality("(a) SwAV prototypes, plain", prototype_assignments(z, w, temp=args.temp).prototypes, y_test, k)
        run["prototypes_balanced"] = quality("(a) SwAV prototypes, balanced", prototype_assignments(z, w, balanced=True).prototypes, y_test, k)
        run["swav_features_kmeans"] = quality("(b) k-means on SwAV encoder features", kmeans(features(model.encoder, x_test, tfm), k, args.seed), y_test, k)
        run["swav_embeddings_kmeans"] = quality("(b') k-means on SwAV embeddings", kmeans(z, k, args.seed), y_test, k)
    fm.write_results(results, args.out)
    return results


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_protos", type=int, nargs="+", default=[10, 30], help="one pretraining per value; k of the k-means rows")
    p.add_argument("--minutes", type=float, default=20, help="pretraining budget per value of --n_protos")
    p.add_argument("--epochs", type=int, default=3)
    fm.add_training_args(p)   # --bs, --lr, --wd, widths, --eps, --temp, --freeze_protos_iters, --threads, --device, --seed
    p.add_argument("--bn_recal", type=int, default=0, help="recompute the BatchNorm statistics on this many full-size training images after pretraining (0: the model as trained)")
    p.add_argument("--tiny", action="store_true", help="1.5k training and 600 test images (a check of the script, not a measurement)")
    p.add_argument("--out", default="bench/clusters.json")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
