"""RAWKS (Vernaza & Chandraker 2017) on DeepLab-v2 ResNet-101 from scribbles, VOC 2012 + SBD.

The paper trains from ScribbleSup's hand-drawn scribbles; rwseg generates scribbles from the
dense labels (``rwseg.rawks.scribbles_from_labels``), which is not the same supervision.
Label propagation at 1/4 of the 320 crop.
"""

from rwseg.configs import common, get_config as method_config
from rwseg.configs.voc import deeplab_v2


def get_config(arg=None):
    c = deeplab_v2(method_config("rawks"))
    c.rawks.layer.boundary_channels = 32
    c.rawks.layer.downsample = 4
    return common.finalize(c, arg)
