"""RAWKS (Vernaza & Chandraker): boundary network + segmentation network trained from generated
scribbles with the uncertainty-weighted loss (eq. 11)."""

import ml_collections

from rwseg.configs import common


def get_config(arg=None):
    c = common.get_config("rawks")
    c.data.scribbles = True       # batches carry "scribbles" (rwseg.data.scribbles_from_labels)
    # rare non-finite gradients through the hitting-probability solve (seen once in 300
    # steps, float32): skip such updates instead of stopping the run
    c.optimizer.max_nonfinite_skips = 10
    c.rawks = ml_collections.ConfigDict()
    # the arguments of rwseg.layers.RandomWalkLabelPropagation, under its names
    c.rawks.layer = ml_collections.ConfigDict()
    c.rawks.layer.boundary_channels = 16  # boundary network channels
    c.rawks.layer.boundary_depth = 2      # boundary network 3x3 convs
    c.rawks.layer.downsample = 2          # label propagation at H/2 x W/2
    c.rawks.layer.temperature = 1.0       # uncertainty weight w = exp(-temperature H(P))
    c.rawks.layer.max_boundary = 10.0     # clamp of B
    c.rawks.layer.tol = 1e-4
    c.rawks.layer.max_iters = 300
    # training
    c.rawks.targets = "soft"      # eq. 11; "hard" (argmax P, with freeze_method only) is a diagnostic
    c = common.finalize(c, arg)
    if arg == "smoke":
        c.rawks.layer.boundary_channels = 8
    return c
