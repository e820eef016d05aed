"""How the cost of the project's SwAV step grows: step time against the number of small crops, the number of
prototypes and the queue length, next to the floor (the same model's forward and backward on crops made beforehand).

Each point runs the project (`Learner` + `SWAV`, as in `bench_step.py`) and the floor interleaved, `--rounds` times;
`project/floor` is the median over rounds of the ratio within each round, `overhead` is project minus floor (medians): what SwAV itself (augmentation, Sinkhorn, loss, queue) and fastai add to the step.
Everything not varied stays at the `--config` values (CPU: resnet18, 2x64 + 6x32 px crops, batch 32, 3000 prototypes,
queue 480 per assignment crop when on).

    python bench/bench_scaling.py                                  # all three sweeps, CPU config
    python bench/bench_scaling.py --vary protos --protos 300,3000,30000
    python bench/bench_scaling.py --config gpu --device cuda
    python bench/bench_scaling.py --tiny
"""
from __future__ import annotations
import argparse
import copy
import sys

import harness as H
from contenders import Floor, Project, add_common_args, describe, finish_args, make_images, n_images

SWEEPS = ("crops", "protos", "queue")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--vary", default=",".join(SWEEPS), help="Comma-separated sweeps: " + ", ".join(SWEEPS))
    p.add_argument("--small-crop-counts", default="2,4,6,8,10", help="Numbers of small crops (crops sweep)")
    p.add_argument("--protos", default="300,3000,30000", help="Numbers of prototypes (protos sweep)")
    p.add_argument("--queues", help="Queue lengths per assignment crop, 0 for none (queue sweep); "
                   "default 0, the config's, 3840")
    p.set_defaults(steps=2, rounds=2)   # many points: fewer rounds each than bench_step.py
    a = finish_args(p.parse_args(argv))
    if a.tiny: a.small_crop_counts, a.protos, a.queues = "2,4", "10,40", "0,8"
    if a.queues is None: a.queues = f"0,{a.queue},3840"
    return a


def point(a: argparse.Namespace, queue: int) -> dict:
    "Project (queue `queue`, 0: none) and floor at the settings of `a`, interleaved"
    images = make_images(n_images(a, queue), a.img_size, a.seed)
    times = H.run_interleaved([Project(a, images, queue), Floor(a, images)], a.rounds, a.steps, a.warmup)
    row = {name: H.median_ms(H.flat(rounds)) for name, rounds in times.items()}
    row["overhead"] = row["project"] - row["floor"]
    row["ratio"] = H.paired_ratio(times["project"], times["floor"])
    return row


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    rows = []
    for sweep in [s for s in a.vary.split(",") if s]:
        values = dict(crops=a.small_crop_counts, protos=a.protos, queue=a.queues)[sweep]
        for v in [int(x) for x in values.split(",")]:
            b = copy.copy(a)
            if sweep == "crops": b.num_crops = (a.num_crops[0], v)
            if sweep == "protos": b.n_protos = v
            queue = v if sweep == "queue" else a.queue
            print(f"{sweep} = {v}:", file=sys.stderr, flush=True)
            rows.append(dict(sweep=sweep, value=v, **point(b, queue)))
    report(a, rows)
    H.write_json(a.json, a, rows)
    return rows


def report(a: argparse.Namespace, rows: list[dict]):
    print(f"Cost growth of the project's step (queue {a.queue} unless varied): {describe(a)}")
    for sweep in dict.fromkeys(r["sweep"] for r in rows):
        name = dict(crops="small crops", protos="n_protos", queue="queue length")[sweep]
        print()
        H.print_table([name, "project ms", "floor ms", "overhead ms", "project/floor"],
                      [[r["value"], f"{r['project']:.0f}", f"{r['floor']:.0f}", f"{r['overhead']:.0f}", f"{r['ratio']:.2f}"]
                       for r in rows if r["sweep"] == sweep])


if __name__ == "__main__": main()
