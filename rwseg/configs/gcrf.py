"""GCRF (Vemulapalli et al.): unary + pairwise networks + Gaussian mean field (5 unrolled layers in
training, to a tolerance at evaluation), optional similarity pretraining."""

import ml_collections

from rwseg.configs import common


def get_config(arg=None):
    c = common.get_config("gcrf")
    c.gcrf = ml_collections.ConfigDict()
    c.gcrf.radius = 3             # bipartite window (2r+1)^2 (paper: 11 at 1/8 of 512 px)
    c.gcrf.crf_downsample = 4     # GMF at H/4 x W/4 (paper: 1/8)
    c.gcrf.features = 16          # pairwise feature channels D
    c.gcrf.filters = 0            # M learned filters (0 = number of classes, as the paper)
    c.gcrf.num_layers = 5         # unrolled GMF layers in training
    c.gcrf.tol = 1e-4             # evaluation: GMF to this tolerance
    c.gcrf.max_layers = 200
    c.gcrf.margin = 0.5           # T of eq. 6
    c.gcrf.aux_weight = 0.5       # cross-entropy on the unary logits
    c.gcrf.pretrain_steps = 50    # similarity pretraining (eq. 7) during the first steps
    c.gcrf.pretrain_weight = 0.1
    c.gcrf.compat_init = 0.5      # R = compat_init * I at initialisation
    c = common.finalize(c, arg)
    if arg == "smoke":
        c.gcrf.radius = 1
        c.gcrf.crf_downsample = 2
        c.gcrf.pretrain_steps = 2
    return c
