"""DeepLab-v2 ResNet-101 (ASPP, output stride 8) on VOC 2012 + SBD: the network every method refines.

The refinement papers' own DeepLab baselines (not measured here): DeepLab ResNet-101 (ASPP, COCO
pretraining too) 76.46 mIoU on VOC 2012 val (SPN paper, Table 3); DeepLabv3+ 77.93 (dilated
affinity paper, Table 5).
"""

from rwseg.configs import common, get_config as method_config
from rwseg.configs.voc import deeplab_v2


def get_config(arg=None):
    c = deeplab_v2(method_config("baseline"))
    return common.finalize(c, arg)
