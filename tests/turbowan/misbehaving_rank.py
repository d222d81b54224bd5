"""Stand-in for a rank that dies or hangs (run under torchrun by the distributed tests).

`python misbehaving_rank.py die ARGS...` runs `turbowan generate ARGS` in this process; on
rank 1 the sampling is replaced by a SIGKILL of the process, as a crashed GPU process (or
the kernel's OOM killer) would end it."""

import os
import signal
import sys
import time

from turbowan.cli.main import main
from turbowan.pipeline import i2v

if os.environ.get("RANK") == "1":
    def sample(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # not reached

    i2v.I2VPipeline.sample = sample

sys.exit(main(["generate", *sys.argv[2:]]))
