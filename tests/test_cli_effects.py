"""Each `swav_pretrain` option does what it says: every test here fails if its option were parsed and ignored.

Runs go through the command line (`cli.main(argv)`, in this process) on 64 embedded digits at 16 px, one epoch: about
2 s each, each made once and shared by the tests that read it. What a run did is read from the files it wrote
(`history.csv`, `encoder.pth`, `swav_model.pth`, `crops.png`) and, for what no file shows, from two spies on fastai and
torch set for this module: the weights when `Learner.fit` starts (the initial weights) and their memory format when it
ends, and the worker processes of each multi-process `DataLoader` iterator.

The premise of the "changes the run" tests: one seed gives the same run to the bit (`test_same_settings_give_the_same_run`),
so a run that differs from the base run differs because of its option.
"""
from __future__ import annotations
import csv
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from fastai.learner import Learner
from PIL import Image
from torch.utils.data import dataloader

from helpers import computed, digits_folder, on_checkpoint, run_main
from self_supervised_swav.checkpoint import Interrupted
from self_supervised_swav.cli import main
from self_supervised_swav.modelfile import load_pretrained_encoder

BASE = ["--epochs", 1, "--max_images", 64, "--bs", 16, "--size", 16, "--crop_sizes", 16, 8, "--n_protos", 8]
VARIANTS = dict(
    base=[], seed=["--seed", 7], slow=["--lr", 1e-6], rgb=["--rgb"], flip=["--flip_p", 1.], no_jitter=["--jitter_s", 0.],
    fastai=["--recipe", "fastai"], more_crops=["--num_crops", 2, 4], crop_sizes=["--crop_sizes", 16, 12],
    min_scales=["--min_scales", 0.9, 0.35], max_scales=["--max_scales", 0.8, 0.6],
    cl_full=["--channels_last", "--epochs", 2], cl_stopped=["--channels_last", "--epochs", 2],
    workers_0=["--workers", 0], workers_1=["--workers", 1])
FOLDER_RUNS = ("workers_0", "workers_1")   # --workers is for folders: these read 40 digits saved as PNGs


@dataclass
class Run:
    "A finished run: its folder, exit status, stderr, and what the spies saw"
    out: Path
    code: int = 0
    err: str = ""
    fit_starts: list[dict] = field(default_factory=list)       # the model's state_dict when each `Learner.fit` started
    channels_last: list[bool] = field(default_factory=list)    # whether its convolution weights were channels-last when it ended
    workers: list[int] = field(default_factory=list)           # num_workers of each multi-process DataLoader iterator

    def history(self) -> list[dict]:
        "The rows of history.csv, without the timings of each epoch (`helpers.TIMING`; nor the header that a resumed run writes again)"
        with open(self.out / "history.csv") as f:
            return computed(r for r in csv.DictReader(f) if r["epoch"] != "epoch")
    def losses(self) -> list[float]: return [float(r["train_loss"]) for r in self.history()]
    def encoder(self) -> dict: return torch.load(self.out / "encoder.pth", weights_only=True)["encoder"]
    def model(self) -> dict: return torch.load(self.out / "swav_model.pth", weights_only=True)["model"]
    def initial_encoder(self) -> dict: return {k.removeprefix("encoder."): v for k, v in self.fit_starts[0].items() if k.startswith("encoder.")}


def is_channels_last(model: torch.nn.Module) -> bool:
    "Every 4-d weight is stored channels-last (some, 1x1 or one channel, are also contiguous: not all)"
    ws = [p for p in model.parameters() if p.dim() == 4]
    return all(p.is_contiguous(memory_format=torch.channels_last) for p in ws) and not all(p.is_contiguous() for p in ws)


@pytest.fixture(scope="module")
def spies():
    "While this module runs (on one torch thread): `spies.run` (the Run being made) collects what `Learner.fit` starts from and the DataLoader workers"
    class Spies: run = None
    fit, mp_iter = Learner.fit, dataloader._MultiProcessingDataLoaderIter.__init__
    def spy_fit(learn, *args, **kwargs):
        run = Spies.run
        if run is not None: run.fit_starts.append({k: v.detach().clone() for k, v in learn.model.state_dict().items()})
        try: return fit(learn, *args, **kwargs)
        finally:
            if run is not None: run.channels_last.append(is_channels_last(learn.model))
    def spy_iter(it, loader, *args, **kwargs):
        if Spies.run is not None: Spies.run.workers.append(loader.num_workers)
        return mp_iter(it, loader, *args, **kwargs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny runs: a second thread saves nothing, and on busy cores costs ten times the time
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Learner, "fit", spy_fit)
            mp.setattr(dataloader._MultiProcessingDataLoaderIter, "__init__", spy_iter)
            yield Spies
    finally: torch.set_num_threads(threads)


def pretrain(spies, out: Path, *argv, stop_after: int | None = None) -> Run:
    "Run `swav_pretrain BASE argv --output out` here, spied on; `stop_after`: SIGTERM right after that epoch's checkpoint"
    spies.run = run = Run(out)
    try:
        if stop_after is None: run.code, run.err = run_main(main, *BASE, *argv, "--output", out)
        else:
            with on_checkpoint(stop_after, Interrupted(signal.SIGTERM)): run.code, run.err = run_main(main, *BASE, *argv, "--output", out)
    finally: spies.run = None
    return run


@pytest.fixture(scope="module")
def runs(spies, tmp_path_factory, digits_at):
    "`runs(name)`: the finished run of `VARIANTS[name]`, made on first use"
    root, made = tmp_path_factory.mktemp("runs"), {}
    folder = digits_folder(root / "images", digits_at(16), n=40, classes=(0, 1, 2, 3))
    def get(name: str) -> Run:
        if name not in made:
            argv = VARIANTS[name] + (["--path", folder] if name in FOLDER_RUNS else [])
            made[name] = run = pretrain(spies, root / name, *argv)
            assert run.code == 0, run.err[-3000:]
        return made[name]
    return get


def assert_changes_the_run(run: Run, base: Run):
    "Other training losses than the base run's (one seed gives the same run: `test_same_settings_give_the_same_run`)"
    assert len(run.losses()) == len(base.losses()) and run.losses() != base.losses(), (run.losses(), base.losses())


def max_change(a: dict, b: dict) -> float:
    "Largest absolute difference between the float tensors of two state dicts"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


def test_same_settings_give_the_same_run(runs, spies, tmp_path):
    "--overwrite: the run that --output holds is refused without it (files untouched), replaced with it, by the same run to the bit"
    base = runs("base")
    out = tmp_path / "again"
    shutil.copytree(base.out, out)
    (out / "history.csv").write_text("epoch,train_loss\n0,123\n")                     # what a replaced run would keep
    refused = pretrain(spies, out)
    assert refused.code == 2 and "--overwrite" in refused.err.strip().splitlines()[-1]
    assert (out / "history.csv").read_text() == "epoch,train_loss\n0,123\n" and not refused.fit_starts
    again = pretrain(spies, out, "--overwrite")
    assert again.code == 0, again.err[-3000:]
    assert again.history() == base.history()
    for k, v in base.encoder().items(): assert torch.equal(again.encoder()[k], v), k


def test_seed_changes_initial_weights_and_losses(runs):
    base, other = runs("base"), runs("seed")
    assert max_change(other.initial_encoder(), base.initial_encoder()) > 1e-3
    assert_changes_the_run(other, base)


def test_encoder_file_holds_the_trained_encoder(runs):
    "encoder.pth is the encoder trained in the run (the one in swav_model.pth), not its initial weights (BatchNorm recalibrated or not)"
    base = runs("base")
    enc, model = base.encoder(), base.model()
    assert set(enc) == {k.removeprefix("encoder.") for k in model if k.startswith("encoder.")}
    for k, v in enc.items(): assert torch.equal(v, model["encoder." + k]), k
    init = base.initial_encoder()
    weights = [k for k, v in enc.items() if v.dim() == 4]
    assert weights and all(not torch.allclose(enc[k], init[k]) for k in weights)    # every convolution trained
    loaded, _ = load_pretrained_encoder(base.out / "encoder.pth")
    for k, v in loaded.state_dict().items(): assert torch.equal(v, enc[k]), k


def test_lr_sets_the_size_of_the_steps(runs):
    "--lr 1e-6 moves the weights about 250 times less than the auto lr of this batch (2.5e-4): the weights follow the option"
    base, slow = runs("base"), runs("slow")
    assert torch.equal(next(iter(slow.initial_encoder().values())), next(iter(base.initial_encoder().values())))   # the same start
    params = lambda run: {k: v for k, v in run.encoder().items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    moved_base = max_change(params(base), {k: base.initial_encoder()[k] for k in params(base)})
    moved_slow = max_change(params(slow), {k: slow.initial_encoder()[k] for k in params(slow)})
    assert 0 < moved_slow < moved_base / 20, (moved_slow, moved_base)


def first_conv_in_channels(encoder: dict) -> int: return next(v for v in encoder.values() if v.dim() == 4).shape[1]


def test_rgb_gives_a_3_channel_encoder(runs):
    assert first_conv_in_channels(runs("rgb").encoder()) == 3 and first_conv_in_channels(runs("base").encoder()) == 1


@pytest.mark.parametrize("name", ["flip", "no_jitter", "fastai", "more_crops", "crop_sizes", "min_scales", "max_scales"])
def test_augmentation_options_change_the_run(runs, name):
    "Each option of the crops and their augmentations changes the training losses of the same seed"
    assert_changes_the_run(runs(name), runs("base"))


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im: return im.size


def test_crops_png_shows_every_crop(runs):
    "crops.png (written for every recipe) draws each image with all its crops: two more crops, a wider picture"
    base, more, fastai = runs("base"), runs("more_crops"), runs("fastai")
    assert png_size(more.out / "crops.png")[0] > png_size(base.out / "crops.png")[0]
    assert png_size(fastai.out / "crops.png") == png_size(base.out / "crops.png")


def test_channels_last_trains_and_resumes(runs, spies, tmp_path):
    "--channels_last: the model trains in channels-last memory (not without the option), and a run stopped after epoch 0 resumes to the full run"
    full, base = runs("cl_full"), runs("base")
    assert full.channels_last == [True] and base.channels_last == [False]
    stopped = pretrain(spies, tmp_path / "run", *VARIANTS["cl_stopped"], stop_after=0)
    assert stopped.code == 128 + signal.SIGTERM, stopped.err[-3000:]
    resumed = run_main(main, "--resume", tmp_path / "run")
    assert resumed[0] == 0, resumed[1][-3000:]
    done = Run(tmp_path / "run")
    assert [r["epoch"] for r in done.history()] == ["0", "1"]
    # train_loss is fastai's smoothed loss, which restarts with every fit: a resumed run's differs; the weights do not
    assert [r["valid_loss"] for r in done.history()] == [r["valid_loss"] for r in full.history()]
    for k, v in full.model().items(): torch.testing.assert_close(done.model()[k], v, rtol=0, atol=0, msg=k)


def test_workers_sets_the_loader_processes(runs):
    "--workers 0 loads the folder in this process, --workers 1 in one worker process per iterator; the run is the same"
    none, one = runs("workers_0"), runs("workers_1")
    assert none.workers == [] and one.workers and set(one.workers) == {1}
    assert one.history() == none.history()
