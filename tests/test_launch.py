"""Training launched the way PyTorch jobs launch, on CPU processes with gloo: `torchrun` on one machine, `torchrun` as
two machines on 127.0.0.1, and `accelerate launch`. Each runs the user-style script `tests/scripts/train_digits.py`
(a `Learner` with `SWAV`, `learn.fit_one_cycle` inside `swav_distrib_ctx`), which saves per-rank records to compare.

A launched interpreter spends ~8 s importing torch and fastai: each launch takes 15-20 s on two busy cores, so the
fresh two-process run is shared by the tests that read it (module fixture)."""
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from helpers import child_env, tiny_swav_model
from self_supervised_swav.swav import swav_codes, swav_loss

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().parent / "scripts" / "train_digits.py"
TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path) -> dict:
    "The children's environment: one torch thread each, no user-level Accelerate config, `tests/` importable (the script's helpers)"
    return child_env(OMP_NUM_THREADS="1", HF_HOME=str(tmp / "hf"), PYTHONWARNINGS="ignore")


def _check(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def _torchrun(out: Path, *script_args: str, nproc: int = 2) -> str:
    "`torchrun --nproc_per_node nproc SCRIPT --out out ...` on a free port; its output"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(SCRIPT), "--out", str(out), *script_args]
    return _check(subprocess.run(cmd, cwd=ROOT, env=_env(out.parent), capture_output=True, text=True, timeout=TIMEOUT))


def _records(out: Path, name: str, world: int = 2) -> list:
    return [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(world)]


def check_first_step(out: Path, world: int = 2):
    "Each rank's first step (its share of the global batch) against one process on the whole global batch"
    recs = _records(out, "first_step", world)
    for rec in recs[1:]:                                   # DDP started every rank from rank 0's weights
        for k, v in rec["params"].items(): assert torch.equal(v, recs[0]["params"][k]), k
    assert [rec["world"] for rec in recs] == [world] * world
    assert not torch.equal(recs[0]["crops"][0], recs[1]["crops"][0])    # each rank its own images
    model = tiny_swav_model()
    model.load_state_dict(recs[0]["params"], strict=False)
    crops = [torch.cat(cs) for cs in zip(*(rec["crops"] for rec in recs))]   # the global batch, crop by crop
    _, scores = model(crops)
    codes = swav_codes(scores, len(crops[0]), [0, 1])
    assert_close(torch.cat([rec["codes"] for rec in recs], dim=1), codes, atol=1e-5, rtol=0)    # Sinkhorn over the global batch
    bs = len(recs[0]["crops"][0])
    alone = swav_codes(torch.cat([s[:bs] for s in scores.view(len(crops), -1, scores.shape[-1])]), bs, [0, 1])
    assert not torch.allclose(alone, recs[0]["codes"], atol=1e-3)                             # not over rank 0's share alone
    assert_close(sum(rec["loss"] for rec in recs) / world, swav_loss(scores, codes, [0, 1]).detach(), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    "A fresh 2-epoch run under `torchrun --nproc_per_node 2`: (output folder, launcher output)"
    out = tmp_path_factory.mktemp("torchrun") / "run"
    return out, _torchrun(out, "--epochs", "2")


def test_torchrun_first_step_matches_one_process(two_procs):
    out, log = two_procs
    check_first_step(out)
    assert log.count("done: 2 processes") == 1             # only rank 0 prints (and shows progress)
    assert log.count("train_loss") == 1
    assert sorted(p.name for p in (out / "models").iterdir()) == ["swav_0.pth", "swav_1.pth"]   # rank 0 saved


def test_torchrun_checkpoint_resumes_each_rank_queue(two_procs):
    out, _ = two_procs
    ended = _records(out, "queue")
    assert not torch.equal(ended[0], ended[1])             # two different queues, both in rank 0's checkpoint
    assert torch.equal(torch.load(out / "models" / "swav_1.pth", weights_only=False)["model"]["queue.rank_embeddings"], torch.stack(ended))
    resumed = out.parent / "resumed"
    _torchrun(resumed, "--resume", str(out / "models" / "swav_1"), "--epochs", "3", "--start_epoch", "2")
    for mine, before in zip(_records(resumed, "start_queue"), ended): assert torch.equal(mine, before)


def test_torchrun_two_nodes(tmp_path):
    "Two torchrun agents on 127.0.0.1, one process each, meeting through torchrun's rendezvous at rank 0's address"
    out, port = tmp_path / "run", _free_port()
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                                "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                                str(SCRIPT), "--out", str(out), "--epochs", "1"],
                               cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for node in range(2)]
    try: outs = [a.communicate(timeout=TIMEOUT) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None: a.kill()
    for a, (so, se) in zip(agents, outs): assert a.returncode == 0, f"agent failed:\n{(so + se)[-4000:]}"
    check_first_step(out)
    assert [o[0].count("done: 2 processes") for o in outs] == [1, 0]   # node 0 holds rank 0


def test_accelerate_launch(tmp_path):
    "`accelerate launch --multi_gpu` starts torchrun's processes; on a machine without GPUs they train on CPU with gloo"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(SCRIPT), "--out", str(out),
           "--epochs", "1"]
    log = _check(subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT))
    check_first_step(out)
    assert log.count("done: 2 processes") == 1
