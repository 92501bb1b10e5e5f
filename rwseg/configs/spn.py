"""SPN (Liu et al.): guidance network + three-way propagation in 4 directions refining the
upsampled coarse map."""

import ml_collections

from rwseg.configs import common


def get_config(arg=None):
    c = common.get_config("spn")
    c.spn = ml_collections.ConfigDict()
    # the arguments of rwseg.layers.SpatialPropagation, under its names
    c.spn.layer = ml_collections.ConfigDict()
    c.spn.layer.guidance_channels = 16  # guidance network channels
    c.spn.layer.guidance_depth = 2      # guidance 3x3 convs
    c.spn.layer.downsample = 1          # propagation resolution H/f x W/f
    c.spn.layer.merge = "max"           # node-wise max over the 4 directions (the paper's), or "mean"
    c.spn.layer.implementation = "auto"  # propagation kernel (rwseg.spn.spn)
    c.spn.layer.colour_sigma_init = 0.0  # > 0: the gates start with a colour-kernel term of this width
    c.spn.layer.colour_gate_init = 0.99  # its gates' total at zero colour difference (with colour_sigma_init > 0)
    # model and training
    c.spn.aux_weight = 0.5  # coarse cross-entropy weight
    c.spn.guidance_input = "image"  # guidance network input: image[,stem][,features] (rwseg.models.spn)
    c = common.finalize(c, arg)
    if arg == "smoke":
        c.spn.layer.guidance_channels = 8
    return c
