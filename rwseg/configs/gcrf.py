"""GCRF (Vemulapalli et al.): unary + pairwise networks + Gaussian mean field (5 unrolled layers in
training, to a tolerance at evaluation), optional similarity pretraining."""

import ml_collections

from rwseg.configs import common


def get_config(arg=None):
    c = common.get_config("gcrf")
    c.gcrf = ml_collections.ConfigDict()
    # the arguments of rwseg.layers.GaussianCRF, under its names
    c.gcrf.layer = ml_collections.ConfigDict()
    c.gcrf.layer.radius = 3              # bipartite window (2r+1)^2 (paper: 11 at 1/8 of 512 px)
    c.gcrf.layer.downsample = 4          # GMF at H/4 x W/4 (paper: 1/8)
    c.gcrf.layer.embedding_channels = 16  # pairwise feature channels D
    c.gcrf.layer.num_filters = 0         # M learned filters (0 = number of classes, as the paper)
    c.gcrf.layer.num_steps = 5           # unrolled GMF layers in training
    c.gcrf.layer.tol = 1e-4              # evaluation: GMF to this tolerance
    c.gcrf.layer.max_iters = 200
    c.gcrf.layer.margin = 0.5            # T of eq. 6
    c.gcrf.layer.compat_init = 0.5       # R = compat_init * I at initialisation
    c.gcrf.layer.colour_sigma_init = 0.0  # > 0: the similarity starts as the colour kernel of this width
    c.gcrf.layer.eval_radius = 3         # the window at test time (set with radius: the same by default)
    c.gcrf.layer.eval_downsample = 4     # the grid at test time (set with downsample)
    # training
    c.gcrf.aux_weight = 0.5       # cross-entropy on the unary logits
    c.gcrf.pretrain_steps = 50    # similarity pretraining (eq. 7) during the first steps
    c.gcrf.pretrain_weight = 0.1
    c = common.finalize(c, arg)
    if arg == "smoke":
        c.gcrf.layer.radius = c.gcrf.layer.eval_radius = 1
        c.gcrf.layer.downsample = c.gcrf.layer.eval_downsample = 2
        c.gcrf.pretrain_steps = 2
    return c
