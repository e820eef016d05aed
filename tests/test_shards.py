"""`swav_pretrain --path 'shards/train-{0000..0007}.tar'`: the embedded digits converted into WebDataset tar shards, trained
from in one process and in two CPU processes under `torchrun`, resumed, and the bad input that must be one line.

The rule for steps: each process trains `epoch_samples // (bs * processes)` steps per epoch. With the same `--bs`, two
processes each do half the steps of one process, so the steps of all processes together equal the one-process run's
when `epoch_samples` is a multiple of `bs * processes` (here epochs of 80 samples in batches of 20: 4 steps an epoch in
one process, 2 in each of two; 8 and 2 x 4 in the two epochs). The steps are read from the model's own iteration
counter in the checkpoint (`swav_iters`). The one-process run is also the uninterrupted run that a resumed one must equal.

Skipped when the webdataset package is missing (`pip install webdataset`)."""
from __future__ import annotations
import json
import signal
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

pytest.importorskip("webdataset")

from helpers import child_env, digits_folder, on_checkpoint, run_main   # noqa: E402
from self_supervised_swav.checkpoint import Interrupted, read_checkpoint   # noqa: E402
from self_supervised_swav.cli import main, shards_main   # noqa: E402
from self_supervised_swav.shards import ShardSamples, ShardsConfig, folder_to_shards, held_out, shard_files   # noqa: E402

EPOCH = 80   # samples per epoch: 4 batches of 20 in one process, 2 in each of two
RUN = ["--size", 16, "--crop_sizes", 16, 8, "--bs", 20, "--n_protos", 10, "--gray", "--workers", 0, "--epoch_samples", EPOCH, "--epochs", 2]


@pytest.fixture(scope="module")
def spec(tmp_path_factory, digits) -> str:
    "200 digits of 4 classes in 8 shards of 25, through the command: the brace pattern it prints"
    root = tmp_path_factory.mktemp("shards")
    folder = digits_folder(root / "digits", digits, n=200, classes=(0, 1, 2, 3))
    code, err = run_main(shards_main, folder, root / "shards" / "train-%04d.tar", "--shard_size", 25)
    assert code == 0, err
    return str(root / "shards" / "train-{0000..0007}.tar")


def steps(out: Path) -> int:
    "Training steps of a run's process, from the model's iteration counter in its checkpoint"
    return int(read_checkpoint(out / "checkpoint.pth")["model"]["swav_iters.count"])


def results(out: Path) -> dict: return json.loads((out / "swav_pretrain.json").read_text())


@pytest.fixture(scope="module")
def one_process(spec, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    code, err = run_main(main, "--path", spec, *RUN, "--output", out)
    assert code == 0, err
    return out


def test_conversion_writes_every_image_once(spec):
    "The shards hold the 200 files' bytes as they are, each once, with its class; the index counts them"
    import webdataset as wds
    files = shard_files(spec)
    samples = [s for f in files for s in wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([dict(url=str(f), stream=open(f, "rb"))]))]
    folder = Path(spec).parents[1] / "digits"
    originals = {p.read_bytes(): p.parent.name for p in folder.rglob("*.png")}
    assert len(samples) == 200 and len({s["png"] for s in samples}) == 200
    index = json.loads((Path(spec).parent / "train-index.json").read_text())
    assert all(originals[s["png"]] == index["classes"][int(s["cls"])] for s in samples)
    assert index["n_samples"] == 200 and sum(index["shards"].values()) == 200 and len(files) == 8


def test_one_process_trains_epochs_of_samples(one_process):
    "One process: 80 // 20 = 4 steps an epoch; the labels of the shards reach the kNN monitor"
    res = results(one_process)
    assert steps(one_process) == 2 * EPOCH // 20
    assert res["data"]["labelled"] and res["data"]["n_train"] == EPOCH and "shards" in res["data"]["description"]
    assert res["epochs"][-1]["knn_top1"] is not None and res["knn_top1_pretrained"] is not None


def test_torchrun_two_processes_same_total_steps(spec, one_process, tmp_path):
    "Two CPU processes under torchrun, from the same shards: 2 x 2 steps each, 8 in all, as the one process"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "self_supervised_swav.cli",
           "--path", spec, *map(str, RUN), "--output", str(out)]
    res = subprocess.run(cmd, env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("data: shards") == 1 and results(out)["settings"]["world_size"] == 2
    assert steps(out) == 2 * EPOCH // (20 * 2) and 2 * steps(out) == steps(one_process)
    assert results(out)["epochs"][-1]["knn_top1"] is not None


def test_processes_read_their_own_shards(spec):
    "Each of 2 processes x 2 workers reads its own 2 of the 8 shards: no sample twice in an epoch, none held out"
    files, reads = shard_files(spec), []
    for r in range(2):
        ds = ShardSamples(files, 16, bs=10, epoch_samples=160, rank=r, world=2, valid_pct=0.2)
        for w in range(2): reads += [s["__key__"] for s in islice(ds.reader_samples(r * 2 + w, 4), 20)]
    assert len(reads) == len(set(reads)) == 80 and not any(held_out(k, 0.2) for k in reads)


def test_resume_at_an_epoch_boundary_is_exact(spec, one_process, tmp_path):
    "Stopped after epoch 1 of 2 and resumed: the same weights as the uninterrupted run (the stream of epoch 2 depends on the epoch alone)"
    full, part = one_process, tmp_path / "part"
    with on_checkpoint(0, Interrupted(signal.SIGTERM)): code, _ = run_main(main, "--path", spec, *RUN, "--output", part)
    assert code == 128 + signal.SIGTERM
    code, err = run_main(main, "--resume", part)
    assert code == 0, err
    a, b = (torch.load(o / "swav_model.pth", weights_only=True)["model"] for o in (full, part))
    for k in a: torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=k)


def one_line(*argv) -> str:
    "The stderr of `swav_pretrain ARGV` that must fail: one line, exit status 2"
    code, err = run_main(main, *argv)
    assert code == 2 and err.count("\n") == 1, err
    return err


def test_bad_patterns_and_shards_are_one_line(spec, tmp_path):
    folder = Path(spec).parent
    assert "matches no shard" in one_line("--path", str(tmp_path / "none-{0000..0003}.tar"), "--output", tmp_path / "o")
    assert "1 of its 9 shards are missing, first" in one_line("--path", str(folder / "train-{0000..0008}.tar"), "--output", tmp_path / "o")
    bad = tmp_path / "bad-0000.tar"
    bad.write_bytes((folder / "train-0000.tar").read_bytes()[:5000])   # cut in the middle of a member
    assert "--path: " in one_line("--path", str(bad), *RUN[:-4], "--epoch_samples", 20, "--output", tmp_path / "o")
    assert one_line("--path", spec, "--max_images", 10, "--output", tmp_path / "o").startswith("swav_pretrain: error: --max_images applies to folders")
    assert not (tmp_path / "o").exists()


def test_sample_without_image_is_one_line(tmp_path):
    import webdataset as wds
    with wds.TarWriter(str(tmp_path / "x-0.tar"), encoder=False) as sink:
        for i in range(30): sink.write({"__key__": f"{i:04d}", "cls": str(i % 2).encode()})
    err = one_line("--path", str(tmp_path / "x-0.tar"), *RUN[:-4], "--epoch_samples", 20, "--output", tmp_path / "o")
    assert "cannot read image" in err and "has no image (.cls)" in err


def test_conversion_mistakes_are_one_line(tmp_path):
    code, err = run_main(shards_main, tmp_path / "nope", tmp_path / "s-%02d.tar")
    assert code == 2 and err == f"swav_shards: error: folder '{tmp_path / 'nope'}' does not exist\n"
    with pytest.raises(Exception, match="one %d field"): folder_to_shards(ShardsConfig(str(tmp_path), str(tmp_path / "s.tar")))
