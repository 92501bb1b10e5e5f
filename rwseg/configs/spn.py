"""SPN (Liu et al.): guidance network + three-way propagation in 4 directions refining the
upsampled coarse map."""

import ml_collections

from rwseg.configs import common


def get_config(arg=None):
    c = common.get_config("spn")
    c.spn = ml_collections.ConfigDict()
    c.spn.width = 16        # guidance network channels
    c.spn.depth = 2         # guidance 3x3 convs
    c.spn.downsample = 1    # propagation resolution H/f x W/f
    c.spn.aux_weight = 0.5  # coarse cross-entropy weight
    c.spn.guidance_input = "image"  # guidance network input: image[,stem][,features] (rwseg.models.spn)
    c = common.finalize(c, arg)
    if arg == "smoke":
        c.spn.width = 8
    return c
