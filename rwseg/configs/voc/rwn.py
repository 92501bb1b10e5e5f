"""RWN (Bertasius et al. 2017) on DeepLab-v2 ResNet-101, VOC 2012 + SBD.

The paper's training walk uses a disk of radius 40 px and the converged evaluation walk 5 px
at 321 px; here the walk runs at 1/4 of the 320 crop, so radius 10 / 2 walk pixels (40 / 8 px).
"""

from rwseg.configs import common, get_config as method_config
from rwseg.configs.voc import deeplab_v2


def get_config(arg=None):
    c = deeplab_v2(method_config("rwn"))
    c.rwn.layer.downsample = 4
    c.rwn.layer.train_radius = 10
    c.rwn.layer.eval_radius = 2
    return common.finalize(c, arg)
