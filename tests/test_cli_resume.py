"""`swav_pretrain` as a long run: checkpoints every epoch, exact `--resume`, SIGTERM / Ctrl-C / SIGKILL, errors that keep
what was learned, and the refusals that protect an existing run. Small runs on the embedded digits (a few seconds each),
through the command line (`cli.main(argv)`: exit status and stderr).

Every stop happens at a known point, whatever the speed of the machine: right after the checkpoint of an epoch is
written (`helpers.on_checkpoint`), by raising there in this process or, for real signals, by a child process that
signals itself there (`tests/scripts/signalled_pretrain.py`). No test waits for a file or sleeps."""
from __future__ import annotations
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TESTS, assert_same_run, child_env, on_checkpoint, run_epochs, run_main
from self_supervised_swav.checkpoint import Interrupted, read_checkpoint
from self_supervised_swav.cli import main

RUN = ["--max_images", 200, "--size", 16, "--crop_sizes", 16, 8, "--bs", 40, "--n_protos", 10, "--epochs", 3, "--K", 80,
       "--queue_start_pct", 0.3]   # 4 batches an epoch
SIGNALLED = TESTS / "scripts" / "signalled_pretrain.py"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    "The uninterrupted run"
    out = tmp_path_factory.mktemp("full")
    code, err = run_main(main, *RUN, "--output", out)
    assert code == 0, err
    return out


def test_resume_after_sigterm_equals_uninterrupted_run(full_run, tmp_path):
    "SIGTERM after epoch 1 (of 3): one line naming the checkpoint and the resume command; --resume then ends where the full run ends"
    out = tmp_path / "run"
    with on_checkpoint(1, Interrupted(signal.SIGTERM)): code, err = run_main(main, *RUN, "--output", out)
    assert code == 128 + signal.SIGTERM
    msg = err.strip().splitlines()[-1]
    assert msg.startswith("swav_pretrain: stopped by SIGTERM") and "after epoch 2" in msg and f"swav_pretrain --resume {out}" in msg
    assert read_checkpoint(out / "checkpoint.pth")["epoch"] == 1 and (out / "encoder.pth").exists()
    assert run_main(main, "--resume", out)[0] == 0
    assert [e["epoch"] for e in run_epochs(out)] == [0, 1, 2]                    # the CSV log continues, without the skipped epochs
    lines = (out / "history.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("epoch,") and not any(l.startswith("epoch,") for l in lines[1:])   # one header
    assert_same_run(out, full_run)


def test_error_after_first_epoch_keeps_the_run(tmp_path):
    "Any error after the first epoch: the checkpoint and the latest encoder are on disk, and the error is one line"
    out = tmp_path / "run"
    with on_checkpoint(0, RuntimeError("CUDA out of memory\nmore lines")): code, err = run_main(main, *RUN, "--output", out)
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("swav_pretrain: error: ") and "training stopped (RuntimeError: CUDA out of memory)" in last
    assert "more lines" not in err
    assert (out / "encoder.pth").exists() and (out / "swav_model.pth").exists() and read_checkpoint(out / "checkpoint.pth")["epoch"] == 0


def usage_error(*argv) -> str:
    "The one line of a refused command (exit status 2)"
    code, err = run_main(main, *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("swav_pretrain: error: "), (code, err)
    return err


def test_output_with_a_run_is_protected(full_run, tmp_path):
    "A finished run is refused without --overwrite; an interrupted one asks for --resume; --resume of a finished run is refused"
    assert "holds a finished run" in usage_error(*RUN, "--output", full_run)
    assert "that run is finished" in usage_error("--resume", full_run)
    part = tmp_path / "part"; part.mkdir()
    (part / "checkpoint.pth").write_bytes((full_run / "checkpoint.pth").read_bytes())
    assert f"resume it with --resume {part}" in usage_error(*RUN, "--output", part)


def test_bad_resumes_leave_the_checkpoint_intact(full_run, tmp_path):
    "--resume of a folder without a checkpoint, of a corrupt one, and with settings of another run: one line each, files untouched"
    assert "--resume: no checkpoint at" in usage_error("--resume", tmp_path)
    part = tmp_path / "part"; part.mkdir()
    good = (full_run / "checkpoint.pth").read_bytes()
    (part / "checkpoint.pth").write_bytes(good[:len(good) // 3])
    assert "not a readable checkpoint" in usage_error("--resume", part)
    (part / "checkpoint.pth").write_bytes(good)
    err = usage_error("--resume", part, "--arch", "resnet18", "--n_protos", 12)
    assert "--arch resnet10t, --n_protos 10, not --arch resnet18, --n_protos 12" in err
    assert (part / "checkpoint.pth").read_bytes() == good and sorted(os.listdir(part)) == ["checkpoint.pth"]


def signalled(out: Path, epoch: int, sig: str) -> subprocess.CompletedProcess:
    "`swav_pretrain` in a child process that sends itself `sig` right after writing the checkpoint of epoch `epoch`"
    cmd = [sys.executable, str(SIGNALLED), str(epoch), sig, *map(str, RUN), "--output", str(out)]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)


def test_sigkill_after_a_checkpoint_resumes_to_the_uninterrupted_run(full_run, tmp_path):
    "A process killed (SIGKILL: nothing runs after it) right after epoch 0's checkpoint: --resume ends where the full run ends"
    out = tmp_path / "run"
    child = signalled(out, 0, "SIGKILL")
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert read_checkpoint(out / "checkpoint.pth")["epoch"] == 0 and not (out / "swav_pretrain.json").exists()
    assert run_main(main, "--resume", out)[0] == 0          # here: as many torch threads as the child (`child_env`), the same rounding
    assert [e["epoch"] for e in run_epochs(out)] == [0, 1, 2]
    assert_same_run(out, full_run)


def test_sigterm_in_a_real_process_is_one_line(tmp_path):
    "A real SIGTERM (the process signals itself after epoch 0's checkpoint): exit status 128 + 15 and one line naming the resume"
    out = tmp_path / "run"
    child = signalled(out, 0, "SIGTERM")
    assert child.returncode == 128 + signal.SIGTERM, child.stderr[-2000:]
    last = child.stderr.strip().splitlines()[-1]
    assert last.startswith("swav_pretrain: stopped by SIGTERM") and f"--resume {out}" in last
    assert read_checkpoint(out / "checkpoint.pth")["epoch"] == 0


def test_torchrun_two_cpu_processes(tmp_path):
    "`torchrun --nproc_per_node 2 -m self_supervised_swav.cli`: one set of outputs and one report, from rank 0; a resume needs 2 processes"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "self_supervised_swav.cli",
           "--output", str(out), "--max_images", "200", "--size", "16", "--crop_sizes", "16", "8", "--bs", "20", "--n_protos", "10",
           "--epochs", "1"]
    res = subprocess.run(cmd, env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("data: scikit-learn digits") == 1 and res.stdout.count("done in") == 1
    settings = json.loads((out / "settings.json").read_text())
    assert settings["world_size"] == 2 and (out / "swav_model.pth").exists()
    assert read_checkpoint(out / "checkpoint.pth")["settings"]["world_size"] == 2
    (out / "swav_pretrain.json").unlink()                     # as if interrupted: one process cannot resume a 2-process run
    assert "its run was made with 2 processes, not 1 processes" in usage_error("--resume", out)
