"""RWN (Bertasius et al.): affinity branch + random walk (one step with a large radius in
training, converged walk with a small radius at evaluation)."""

import ml_collections

from rwseg.configs import common


def get_config(arg=None):
    c = common.get_config("rwn")
    c.rwn = ml_collections.ConfigDict()
    # the arguments of rwseg.layers.RandomWalkRefinement, under its names
    c.rwn.layer = ml_collections.ConfigDict()
    c.rwn.layer.downsample = 2      # walk at H/2 x W/2
    c.rwn.layer.train_radius = 4    # disk radius of the one-step training walk (walk pixels)
    c.rwn.layer.eval_radius = 2     # disk radius of the converged evaluation walk
    c.rwn.layer.eval_rates = ()     # sparse rings added to it (dilation rates; () = the disk alone)
    c.rwn.layer.alpha = 0.9         # evaluation walk (I - alpha A)^-1 (the paper: 0.01 at 321 px)
    c.rwn.layer.walk_on = "logits"  # what the walk diffuses: "logits" (the paper's) | "probabilities"
    c.rwn.layer.theta_init = -0.2   # initial 1x1 conv weight over each image channel's distances
    c.rwn.layer.feature_theta_init = -0.2  # ... over each stem feature channel's distances
    c.rwn.layer.tol = 1e-5
    c.rwn.layer.max_iters = 200
    # training
    c.rwn.affinity_weight = 1.0   # squared-error affinity loss (§3.3)
    c = common.finalize(c, arg)
    if arg == "smoke":
        c.rwn.layer.train_radius = 2
        c.rwn.layer.eval_radius = 1
    return c
