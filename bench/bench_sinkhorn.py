"""Sinkhorn-Knopp time: the project's `sinkhorn_knopp` against the official SwAV `distributed_sinkhorn`.

The official algorithm (facebookresearch/swav, `main_swav.py`) is the library's `self_supervised_swav.reference.official_sinkhorn_in_dtype`
(one process: its all-reduces are identities), the copy the tests check the project against. Both get the same
prototype scores (cosine similarities of random unit embeddings and prototypes) for every batch size B and number of
prototypes K, in float32 and in bfloat16 (the official code computes in the scores' dtype; the project's computes in
float32 whatever the input).

Rows `B+3840q` are one step's codes with a 3840-long queue: two assignment crops of B samples, each with its own queue,
as `swav_codes(..., queue_scores=...)` computes them in one batched call and the official code in a loop over crops.
`max err` is the largest absolute difference of the codes from the official algorithm run in float64.
Contenders are interleaved call by call; each figure is the median over `--repeats` calls after one warm-up call.

    python bench/bench_sinkhorn.py                       # B in 256, 1024, 4096 (+3840 queue) x K in 300, 3000, 30000
    python bench/bench_sinkhorn.py --device cuda
    python bench/bench_sinkhorn.py --sizes 1024 --protos 3000 --dtypes float32
    python bench/bench_sinkhorn.py --tiny
"""
from __future__ import annotations
import argparse
import sys

import torch
import torch.nn.functional as F
from torch import Tensor

import harness as H
from self_supervised_swav.reference import official_sinkhorn, official_sinkhorn_in_dtype

EPS, N_ITERS = 0.05, 3


def official_codes(scores: Tensor, queue_scores: Tensor | None, bs: int) -> Tensor:
    "The official training loop's codes of each assignment crop: `distributed_sinkhorn(cat(queue, out))[-bs:]`"
    outs = scores.view(-1, bs, scores.shape[-1])
    if queue_scores is None: return torch.stack([official_sinkhorn_in_dtype(o, EPS, N_ITERS) for o in outs])
    return torch.stack([official_sinkhorn_in_dtype(torch.cat([q, o]), EPS, N_ITERS)[-bs:] for q, o in zip(queue_scores, outs)])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--sizes", default="256,1024,4096", help="Batch sizes B")
    p.add_argument("--protos", default="300,3000,30000", help="Numbers of prototypes K")
    p.add_argument("--queue", type=int, default=3840, help="Queue length of the queue rows (0: none)")
    p.add_argument("--queue-bs", type=int, default=256, help="Batch size of the queue rows")
    p.add_argument("--dtypes", default="float32,bfloat16", help="Dtypes of the scores")
    p.add_argument("--repeats", type=int, default=5, help="Timed calls per contender and size")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0: torch's default (all cores)")
    p.add_argument("--json", help="Also write the results to this JSON file")
    p.add_argument("--tiny", action="store_true", help="A seconds-long configuration, to check the script runs")
    a = p.parse_args(argv)
    if a.tiny: a.sizes, a.protos, a.queue, a.queue_bs, a.repeats = "16", "10", 24, 8, 2
    H.set_threads(a.threads)
    a.device = torch.device(a.device)
    return a


def scores_for(n: int, n_protos: int, device: torch.device, seed: int = 0) -> Tensor:
    "Cosine similarities `[n, n_protos]` of random unit embeddings (128-d) and random unit prototypes"
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, 128, generator=g), dim=1)
    w = F.normalize(torch.randn(n_protos, 128, generator=g), dim=1)
    return (z @ w.t()).to(device)


def bench_case(a, label: str, contenders: dict, reference) -> dict:
    "Interleaved calls of every contender; median ms and error against the float64 reference"
    outs = {k: fn() for k, fn in contenders.items()}   # warm-up, and the outputs for the error
    times = H.run_interleaved([H.Calls(k, fn, a.device) for k, fn in contenders.items()], a.repeats, 1, quiet=True)
    ref = reference()
    row = dict(case=label)
    for k in contenders:
        row[f"{k}_ms"] = H.median_ms(H.flat(times[k]))
        row[f"{k}_err"] = (outs[k].double() - ref).abs().max().item()
    del outs, ref
    return row


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    from self_supervised_swav.swav import sinkhorn_knopp, swav_codes
    sizes, protos = [int(x) for x in a.sizes.split(",")], [int(x) for x in a.protos.split(",")]
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")]
    rows = []
    for n_protos in protos:
        for dtype in dtypes:
            cases = [(f"B={b}", b, 0) for b in sizes] + ([(f"B={a.queue_bs}+{a.queue}q x2", a.queue_bs, a.queue)] if a.queue else [])
            for label, bs, queue in cases:
                n_crops = 2 if queue else 1
                s = scores_for(n_crops * bs, n_protos, a.device).to(dtype)
                qs = scores_for(n_crops * queue, n_protos, a.device, seed=1).to(dtype).view(n_crops, queue, n_protos) if queue else None
                if queue:
                    fns = dict(project=lambda: swav_codes(s, bs, [0, 1], EPS, N_ITERS, qs),
                               official=lambda: official_codes(s, qs, bs))
                    ref = lambda: official_codes(s.double(), qs.double(), bs)
                else:
                    fns = dict(project=lambda: sinkhorn_knopp(s, EPS, N_ITERS),
                               official=lambda: official_sinkhorn_in_dtype(s, EPS, N_ITERS))
                    ref = lambda: official_sinkhorn(s, EPS, N_ITERS)
                row = bench_case(a, label, fns, ref)
                row.update(K=n_protos, dtype=str(dtype).replace("torch.", ""))
                rows.append(row)
                print(f"  K={n_protos} {row['dtype']} {label}: " + ", ".join(f"{k} {row[k + '_ms']:.1f} ms" for k in fns),
                      file=sys.stderr, flush=True)
                s = qs = None   # free the scores before the next case (the lambdas above are done with them)
    report(a, rows)
    H.write_json(a.json, a, rows)
    return rows


def report(a, rows: list[dict]):
    print(f"Sinkhorn-Knopp ({N_ITERS} iterations, eps {EPS}) on {a.device}, {torch.get_num_threads()} torch threads: "
          f"median of {a.repeats} interleaved calls; speed-up = official ms / project ms (> 1: project faster)")
    H.print_table(["K", "dtype", "scores", "project ms", "official ms", "speed-up", "project max err", "official max err"],
                  [[r["K"], r["dtype"], r["case"], f"{r['project_ms']:.2f}", f"{r['official_ms']:.2f}",
                    f"{r['official_ms'] / r['project_ms']:.2f}", f"{r['project_err']:.1e}", f"{r['official_err']:.1e}"] for r in rows])


if __name__ == "__main__": main()
