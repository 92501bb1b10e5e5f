"""SPN (Liu et al. 2017) on DeepLab-v2 ResNet-101, VOC 2012 + SBD.

The paper refines a DeepLab ResNet-101 (ASPP, COCO-pretrained): 76.46 -> 79.76 mIoU on VOC 2012
val with the three-way SPN (Table 3; dense CRF: 77.69, Table 2); not measured here. The
paper's guidance network is a VGG-16 encoder-decoder; here a small conv stack on the image and
the backbone's first-layer features. The propagation runs at 1/4 of the 320 crop (80 x 80).
"""

from rwseg.configs import common, get_config as method_config
from rwseg.configs.voc import deeplab_v2


def get_config(arg=None):
    c = deeplab_v2(method_config("spn"))
    c.spn.layer.guidance_channels = 32
    c.spn.layer.guidance_depth = 3
    c.spn.layer.downsample = 4
    c.spn.guidance_input = "image,stem"
    return common.finalize(c, arg)
