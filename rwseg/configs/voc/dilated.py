"""Dilated affinity (Wu et al.) on DeepLabv3+ ResNet-101 (output stride 16), VOC 2012 + SBD.

The affinity head reads the v3+ decoder features (stride 4) and the first-layer features; the
rates are the paper's at 512 px.
"""

from rwseg.configs import common, get_config as method_config
from rwseg.configs.voc import deeplab_v3plus


def get_config(arg=None):
    c = deeplab_v3plus(method_config("dilated"))
    c.dilated.layer.rates = (8, (12, 24), 16)
    c.dilated.layer.decoder_width = 64
    c.dilated.layer.decoder_depth = 1
    return common.finalize(c, arg)
