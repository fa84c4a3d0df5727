"""experiments/train.py as on GPUs whose fused kernel fails its probe on process 1 only.

The platform reads as 'gpu' to the kernel dispatch, and our Pallas kernel is a stand-in: the XLA
kernel behind the fused kernels' layout, which fails to compile on process 1. At exit it prints
the kernels this process's attention calls ran. multihost_test.py runs it.
"""

import atexit
import os
import runpy
import sys
from typing import ClassVar

import jax

from ringattn.attention.kernels import dispatch, fused

TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "train.py")


class StandIn(fused.FusedXla):
    name: ClassVar[str] = "pallas_gpu"

    def fwd_pass(self, cfg, *args):
        if jax.process_index() == 1:
            raise RuntimeError("the stand-in kernel does not compile on this host")
        return super().fwd_pass(cfg, *args)


ran = set()
resolve = dispatch.resolve


def spy(*args, **kwargs):
    kern = resolve(*args, **kwargs)
    ran.add(type(kern).__name__)
    return kern


dispatch.resolve = spy
dispatch.platform = lambda: "gpu"
dispatch.PallasGpu = StandIn
atexit.register(lambda: print(f"kernels run: {sorted(ran)}", flush=True))
sys.argv[0] = TRAIN
runpy.run_path(TRAIN, run_name="__main__")
