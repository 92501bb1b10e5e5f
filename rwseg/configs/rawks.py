"""RAWKS (Vernaza & Chandraker): boundary network + segmentation network trained from generated
scribbles with the uncertainty-weighted loss (eq. 11)."""

import ml_collections

from rwseg.configs import common


def get_config(arg=None):
    c = common.get_config("rawks")
    c.data.scribbles = True       # batches carry "scribbles" (rwseg.rawks.scribbles_from_labels)
    # rare non-finite gradients through the hitting-probability solve (seen once in 300
    # steps, float32): skip such updates instead of stopping the run
    c.optimizer.max_nonfinite_skips = 10
    c.rawks = ml_collections.ConfigDict()
    c.rawks.width = 16            # boundary network channels
    c.rawks.depth = 2             # boundary network 3x3 convs
    c.rawks.downsample = 2        # label propagation at H/2 x W/2
    c.rawks.alpha = 1.0           # uncertainty weight w = exp(-alpha H(P))
    c.rawks.max_boundary = 10.0   # clamp of B
    c.rawks.tol = 1e-4
    c.rawks.max_iters = 300
    c.rawks.targets = "soft"      # eq. 11; "hard" (argmax P, with freeze_method only) is a diagnostic
    c = common.finalize(c, arg)
    if arg == "smoke":
        c.rawks.width = 8
    return c
