"""GCRF / GMF (Vemulapalli et al. 2016) on a DeepLab-LargeFOV ResNet-101 unary, VOC 2012 + SBD.

The paper's unary is DeepLab-LargeFOV on VGG-16 (no VGG backbone here: LargeFOV's head on
ResNet-101); GMF at 1/8 resolution (the paper's), window radius 5 at 1/8 (40 px at 320).
"""

from rwseg.configs import common, get_config as method_config
from rwseg.configs.voc import deeplab_v2


def get_config(arg=None):
    c = deeplab_v2(method_config("gcrf"), head="largefov")
    c.gcrf.layer.downsample = c.gcrf.layer.eval_downsample = 8
    c.gcrf.layer.radius = c.gcrf.layer.eval_radius = 5
    c.gcrf.layer.embedding_channels = 64
    c.gcrf.pretrain_steps = 2000
    return common.finalize(c, arg)
