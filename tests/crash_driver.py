"""A `lorakit train --resume` run that tests can kill: run as ``python -m tests.crash_driver CONFIG KILL_AT DELAY``.

KILL_AT > 0: the process SIGKILLs itself halfway through writing checkpoint step KILL_AT (after the adapter
files, in the middle of the trainer state), as a power cut or the OOM killer would. DELAY: seconds of sleep
added to each step, so that a parent process can kill the run at a random moment between steps.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def main() -> None:
    config, kill_at, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    from lorakit.train import checkpoint, loop, trainer
    from lorakit.train.config import load_config

    real_step, real_save = loop.Loop._step, checkpoint.write_safetensors

    def slow_step(self, indices):
        time.sleep(delay)
        return real_step(self, indices)

    def dying_save(tensors, path):
        if kill_at and f"step-{kill_at:07d}" in str(path):
            data = b"\0" * 4096  # the start of a file, then the process dies
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(tensors, path)

    loop.Loop._step = slow_step
    checkpoint.write_safetensors = dying_save
    trainer.train(load_config(config), resume=True, progress=False)


if __name__ == "__main__":
    main()
