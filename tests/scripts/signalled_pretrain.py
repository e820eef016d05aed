"""`swav_pretrain` that sends itself a signal right after the checkpoint of an epoch is written: a kill at a known point,
whatever the speed of the machine, as `tests/test_cli_resume.py` runs it:

    python tests/scripts/signalled_pretrain.py EPOCH SIGNAL [swav_pretrain options...]

e.g. `... 0 SIGKILL --output run --epochs 3`: the checkpoint of epoch 0 is complete on disk, then the process dies.
`tests/` must be importable (`helpers.child_env`).
"""
import os
import signal
import sys

from helpers import on_checkpoint
from self_supervised_swav.cli import main

if __name__ == "__main__":
    epoch, sig = int(sys.argv[1]), signal.Signals[sys.argv[2]]
    with on_checkpoint(epoch, lambda: os.kill(os.getpid(), sig)): main(sys.argv[3:])
