"""A user's SwAV pretraining script on digits, as the launcher tests run it:

    torchrun --nproc_per_node 2 tests/scripts/train_digits.py --out DIR [--resume DIR0/models/swav_1 --start_epoch 2 --epochs 3]

It builds a `Learner` with `SWAV` and fits inside `swav_distrib_ctx` (fastai's `learn.distrib_ctx()` on GPUs). Each rank
saves to `DIR` what the tests compare: its first training step (`first_step_rank{r}.pt`: crops, weights, codes, loss;
codes without the queue, which is empty at the first step of a fresh run),
its queue at the end (`queue_rank{r}.pt`) and at the start of the fit (`start_queue_rank{r}.pt`); rank 0 saves the
checkpoints `DIR/models/swav_{epoch}.pth` (fastai's `SaveModelCallback`, from rank 0 only).
"""
import argparse
import os
from pathlib import Path

import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (adds `Learner.fit_one_cycle`)
from fastai.callback.tracker import SaveModelCallback
from fastai.learner import Learner
from fastai.torch_core import get_model

from helpers import tiny_pipelines, tiny_swav_model   # tests/ is on PYTHONPATH (`helpers.child_env`)
from self_supervised_swav.data import digits_images, image_tensor_dls
from self_supervised_swav.distributed import is_main_process, swav_distrib_ctx, world_rank
from self_supervised_swav.swav import SWAV, swav_codes


class RecordRun(Callback):
    "Save this rank's first training step (crops, weights, scores, codes, loss) and its queue at the start of the fit"
    order = 12                                            # after SWAV (9) made the crops and DDP wrapped the model (11)
    def __init__(self, out: Path): self.out, self.done = Path(out), False
    def _save(self, name: str, obj): torch.save(obj, self.out / f"{name}_rank{world_rank()[1]}.pt")
    def before_train(self):
        if not self.done: self._save("start_queue", get_model(self.model).queue.embeddings.clone())
    def after_loss(self):
        if not self.training or self.done: return
        swav, (_, scores) = self.learn.swav, self.pred
        bs = scores.shape[0] // len(swav.augs)
        codes = swav_codes(scores, bs, swav.crop_assgn_ids, swav.eps, swav.n_sinkh_iter)   # as the loss computed them
        params = {k: v.detach().clone() for k, v in get_model(self.model).named_parameters()}
        self._save("first_step", dict(crops=[c.clone() for c in self.xb[0]], params=params, scores=scores.detach().clone(),
                                      codes=codes, loss=self.loss.detach().clone(), world=world_rank()[0]))
        self.done = True


def parse_args(argv=None) -> argparse.Namespace:
    "The script's options (argparse: fastcore's `call_parse` spells them with hyphens since fastcore 2)"
    p = argparse.ArgumentParser(description="A user's SwAV pretraining script on digits")
    p.add_argument("--out", default="swav_run", help="folder of the records and checkpoints")
    p.add_argument("--epochs", type=int, default=2, help="total epochs of the run")
    p.add_argument("--bs", type=int, default=8, help="batch size per process")
    p.add_argument("--K", type=int, default=8, help="queue length per process")
    p.add_argument("--n", type=int, default=96, help="digits used (80 %% train)")
    p.add_argument("--resume", default="", help="checkpoint to resume from, a path without .pth ('': start afresh)")
    p.add_argument("--start_epoch", type=int, default=0, help="first epoch to fit (after the resumed checkpoint's)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    out, epochs, bs, K, n, resume, start_epoch = a.out, a.epochs, a.bs, a.K, a.n, a.resume, a.start_epoch
    torch.manual_seed(0)                                  # the same initial weights on every rank
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    x, y = digits_images(size=16)
    dls = image_tensor_dls(x[:n], y[:n], bs=bs, valid_pct=0.2, device="cpu")
    swav = SWAV(tiny_pipelines(), [0, 1], K=K, queue_start_pct=0., freeze_protos_iters=0)
    learn = Learner(dls, tiny_swav_model(), cbs=[swav, RecordRun(out)], path=out)
    if resume: learn.load(Path(resume).absolute(), with_opt=True)   # rank 0's checkpoint, on every rank: each takes its own queue
    save = SaveModelCallback(every_epoch=True, with_opt=True, fname="swav")
    with swav_distrib_ctx(learn):
        learn.fit_one_cycle(epochs, 1e-2, start_epoch=start_epoch, cbs=save)
    torch.save(get_model(learn.model).queue.embeddings, out / f"queue_rank{world_rank()[1]}.pt")
    if is_main_process(): print(f"done: {world_rank()[0]} processes, {epochs} epochs, rank 0 of {os.environ.get('WORLD_SIZE', 1)}")


if __name__ == "__main__": main()
