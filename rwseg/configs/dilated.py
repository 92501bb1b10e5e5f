"""Dilated affinity (Wu et al.): affinity head + focal affinity loss in training,
affinity propagation at evaluation."""

import ml_collections

from rwseg.configs import common


def get_config(arg=None):
    c = common.get_config("dilated")
    c.dilated = ml_collections.ConfigDict()
    # the arguments of rwseg.layers.DilatedAffinity, under its names
    c.dilated.layer = ml_collections.ConfigDict()
    c.dilated.layer.rates = (2, 4, 8)   # full-resolution pixels (paper at 512 px: 8, (12, 24), 16)
    c.dilated.layer.decoder_width = 0   # 3x3 conv blocks between the features and the 1x1 affinity head
    c.dilated.layer.decoder_depth = 0   # (0: the head is a 1x1 conv on the features)
    c.dilated.layer.gamma = 2.0         # focal loss exponent
    c.dilated.layer.lam = 6.0           # propagation: weight of the pixel's own prediction
    c.dilated.layer.mu = 7.0            # propagation: steepness of the affinity gate
    c.dilated.layer.num_steps = 10      # propagation steps
    c.dilated.layer.colour_sigma_init = 0.0  # > 0: the affinity logits start with the log colour kernel of this width
    # model and training
    c.dilated.use_stem = True     # affinity head also sees the full-resolution stem features
    c.dilated.beta = 1.2          # affinity loss weight
    c.dilated.refined_weight = 0.0  # > 0: + this x the cross-entropy of the propagated prediction (not in the paper)
    c = common.finalize(c, arg)
    if arg == "smoke":
        c.dilated.layer.rates = (1, 2)
    return c
