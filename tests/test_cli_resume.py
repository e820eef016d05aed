"""`swav_pretrain` as a long run: checkpoints every epoch, exact `--resume`, SIGTERM / Ctrl-C / SIGKILL, errors that keep
what was learned, and the refusals that protect an existing run. Small runs on the embedded digits (a few seconds each)."""
from __future__ import annotations
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from self_supervised_swav.checkpoint import read_checkpoint
from self_supervised_swav.cli import RunStopped, UsageError, swav_pretrain

RUN = dict(max_images=200, size=16, crop_sizes=[16, 8], bs=40, n_protos=10, epochs=3, K=80, queue_start_pct=0.3)   # 4 batches an epoch


def epochs(out: Path) -> list[dict]:
    "The epoch table of a run, from its swav_pretrain.json"
    return json.loads((out / "swav_pretrain.json").read_text())["epochs"]


def weights(out: Path) -> dict:
    return torch.load(out / "swav_model.pth", weights_only=True)["model"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    "The uninterrupted run"
    out = tmp_path_factory.mktemp("full")
    swav_pretrain(output=str(out), **RUN)
    return out


class StopAfter:
    "Raise `exc` when the checkpoint of epoch `epoch` is written (patches `save_checkpoint` in the cli's module)"
    def __init__(self, monkeypatch, epoch: int, exc: BaseException):
        import self_supervised_swav.checkpoint as ck
        orig = ck.save_checkpoint
        def save(learn, path, epoch_, *args, **kwargs):
            res = orig(learn, path, epoch_, *args, **kwargs)
            if epoch_ == epoch: raise exc
            return res
        monkeypatch.setattr(ck, "save_checkpoint", save)


def test_resume_after_sigterm_equals_uninterrupted_run(full_run, tmp_path, monkeypatch):
    "SIGTERM after epoch 1 (of 3): one line naming the checkpoint and the resume command; --resume then ends where the full run ends"
    from self_supervised_swav.checkpoint import Interrupted
    out = tmp_path / "run"
    StopAfter(monkeypatch, 1, Interrupted(signal.SIGTERM))
    with pytest.raises(RunStopped) as e: swav_pretrain(output=str(out), **RUN)
    assert e.value.code == 128 + signal.SIGTERM
    msg = str(e.value)
    assert "stopped by SIGTERM" in msg and "after epoch 2" in msg and f"swav_pretrain --resume {out}" in msg and "\n" not in msg
    assert read_checkpoint(out / "checkpoint.pth")["epoch"] == 1 and (out / "encoder.pth").exists()
    monkeypatch.undo()
    swav_pretrain(resume=str(out))
    assert [e["epoch"] for e in epochs(out)] == [0, 1, 2]                    # the CSV log continues, without the skipped epochs
    full, resumed = weights(full_run), weights(out)
    for k in full: torch.testing.assert_close(resumed[k], full[k], atol=0, rtol=0, msg=k)
    for key in ("valid_loss", "knn_top1", "protos_used"): assert epochs(out)[-1][key] == epochs(full_run)[-1][key], key


def test_error_after_first_epoch_keeps_the_run(tmp_path, monkeypatch):
    "Any error after the first epoch: the checkpoint and the latest encoder are on disk, and the error is one line"
    out = tmp_path / "run"
    StopAfter(monkeypatch, 0, RuntimeError("CUDA out of memory\nmore lines"))
    with pytest.raises(RunStopped) as e: swav_pretrain(output=str(out), **RUN)
    assert e.value.code == 1 and "training stopped (RuntimeError: CUDA out of memory)" in str(e.value) and "\n" not in str(e.value)
    assert (out / "encoder.pth").exists() and (out / "swav_model.pth").exists() and read_checkpoint(out / "checkpoint.pth")["epoch"] == 0


def test_output_with_a_run_is_protected(full_run, tmp_path):
    "A finished run is refused without --overwrite; an interrupted one asks for --resume; --resume of a finished run is refused"
    with pytest.raises(UsageError, match="holds a finished run"): swav_pretrain(output=str(full_run), **RUN)
    with pytest.raises(UsageError, match="that run is finished"): swav_pretrain(resume=str(full_run))
    part = tmp_path / "part"; part.mkdir()
    (part / "checkpoint.pth").write_bytes((full_run / "checkpoint.pth").read_bytes())
    with pytest.raises(UsageError, match=f"resume it with --resume {part}"): swav_pretrain(output=str(part), **RUN)


def test_bad_resumes_leave_the_checkpoint_intact(full_run, tmp_path):
    "--resume of a folder without a checkpoint, of a corrupt one, and with settings of another run: one line each, files untouched"
    with pytest.raises(UsageError, match="--resume: no checkpoint at"): swav_pretrain(resume=str(tmp_path))
    part = tmp_path / "part"; part.mkdir()
    good = (full_run / "checkpoint.pth").read_bytes()
    (part / "checkpoint.pth").write_bytes(good[:len(good) // 3])
    with pytest.raises(UsageError, match="not a readable checkpoint"): swav_pretrain(resume=str(part))
    (part / "checkpoint.pth").write_bytes(good)
    with pytest.raises(UsageError) as e: swav_pretrain(resume=str(part), arch="resnet18", n_protos=12)
    assert "--arch resnet10t, --n_protos 10, not --arch resnet18, --n_protos 12" in str(e.value)
    assert (part / "checkpoint.pth").read_bytes() == good and sorted(os.listdir(part)) == ["checkpoint.pth"]


def test_sigterm_and_sigkill_through_the_console_script(tmp_path):
    "The real command: SIGKILL mid-run resumes from the last completed epoch to the uninterrupted result; SIGTERM is one line"
    script = Path(sys.executable).parent / "swav_pretrain"
    flags = [a for k, v in RUN.items() for a in ([f"--{k}", *map(str, v)] if isinstance(v, list) else [f"--{k}", str(v)])]
    args = [str(script), "--output", str(tmp_path / "run")] + flags
    env = dict(os.environ, OMP_NUM_THREADS="1")   # the same threads as the reference run: the same float rounding
    ref = subprocess.run([str(script), "--output", str(tmp_path / "full")] + flags, env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt, deadline = tmp_path / "run" / "checkpoint.pth", time.monotonic() + 240
    while not ckpt.exists() and p.poll() is None and time.monotonic() < deadline: time.sleep(0.2)
    p.send_signal(signal.SIGKILL); p.wait(60)
    assert read_checkpoint(ckpt)["epoch"] in (0, 1)
    out = subprocess.run([str(script), "--resume", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "run")
    for k in full: torch.testing.assert_close(resumed[k], full[k], atol=0, rtol=0, msg=k)
    p = subprocess.Popen([str(script), "--output", str(tmp_path / "term")] + args[3:], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "term" / "checkpoint.pth"
    while not ckpt.exists() and p.poll() is None and time.monotonic() < deadline + 240: time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("swav_pretrain: stopped by SIGTERM") and "--resume" in err


def test_torchrun_two_cpu_processes(tmp_path):
    "`torchrun --nproc_per_node 2 -m self_supervised_swav.cli`: one set of outputs and one report, from rank 0; a resume needs 2 processes"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "self_supervised_swav.cli",
           "--output", str(out), "--max_images", "200", "--size", "16", "--crop_sizes", "16", "8", "--bs", "20", "--n_protos", "10",
           "--epochs", "1"]
    res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("data: scikit-learn digits") == 1 and res.stdout.count("done in") == 1
    settings = json.loads((out / "settings.json").read_text())
    assert settings["world_size"] == 2 and (out / "swav_model.pth").exists()
    assert read_checkpoint(out / "checkpoint.pth")["settings"]["world_size"] == 2
    (out / "swav_pretrain.json").unlink()                     # as if interrupted: one process cannot resume a 2-process run
    with pytest.raises(UsageError, match="its run was made with 2 processes, not 1 processes"): swav_pretrain(resume=str(out))
