"""The seed papers' setting as configs: VOC 2012 + SBD (train_aug), an ImageNet-pretrained
DeepLab-ResNet-101, DeepLab's schedule. One file per method, loaded by path::

    rwseg train --config rwseg/configs/voc/rwn.py --workdir runs/voc_rwn \\
        --config.data.manual_dir=/data/voc_sbd --config.model.pretrained=/ckpt/resnet101.pth

:func:`deeplab_v2` and :func:`deeplab_v3plus` set the shared fields on a method's shipped config
(:mod:`rwseg.configs`); each file then scales the method's own resampling and radii to the crop.

What follows the papers and what does not (see README, "The papers' setting"):

* DeepLab-v2 (Chen et al., TPAMI 2017, §4.1): ResNet-101, output stride 8, ASPP rates
  (6, 12, 18, 24), crop 321, batch 10, SGD momentum 0.9, weight decay 5e-4, learning rate
  2.5e-4 with the "poly" schedule (power 0.9), 20k iterations, random scaling 0.5-1.5 and
  flips. Here: crop 320 (rwseg places cells exactly at any size, Caffe's 8k + 1 is not needed,
  and the methods' pooling factors need multiples of 8), batch 16 (it must divide the chips
  of a v4-8 / v5e-16), and no 10x learning rate on the classifier (one rate for the backbone;
  ``optimizer.method_lr_mult`` scales only the method's own layers).
* DeepLabv3+ (Chen et al., ECCV 2018, §4): output stride 16, ASPP (6, 12, 18), crop 513,
  batch 16, learning rate 0.007, poly, 30k iterations. Here: crop 512, weight decay 1e-4.
* The ImageNet checkpoint is the user's (``config.model.pretrained``); without one the
  backbone starts from random weights with identity BatchNorms, which is not the papers'
  setting.
"""

from __future__ import annotations

__all__ = ["deeplab_v2", "deeplab_v3plus"]


def _common(c, *, crop: int, steps: int, lr: float, weight_decay: float):
    c.data.name = "voc2012_aug"        # train = train_aug (10,582), validation = VOC val (1,449)
    c.data.manual_dir = ""             # a folder holding VOCdevkit/ and benchmark_RELEASE/
    c.data.crop_size = crop
    c.data.scale_range = (0.5, 1.5)    # multi-scale training
    c.data.flip = True
    c.batch_size = 16
    c.num_steps = steps
    c.model.backbone = "resnet101"
    c.model.pretrained = ""            # the torchvision / timm ImageNet ResNet-101 (.pth / .safetensors)
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.learning_rate = lr
    c.optimizer.weight_decay = weight_decay
    c.optimizer.schedule = "poly"
    c.optimizer.power = 0.9
    c.optimizer.end_factor = 0.0
    c.optimizer.warmup_steps = 0
    c.optimizer.grad_clip_norm = 0.0
    c.optimizer.method_lr_mult = 10.0  # the method's freshly initialised layers (DeepLab's 10x for new layers)
    c.checkpoint_every = 2000
    c.eval_batch_size = 16
    c.eval_batches = 0                 # the whole VOC val
    c.progress = True
    return c


def deeplab_v2(c, *, head: str = "aspp"):
    """DeepLab-v2 ResNet-101 (ASPP, or ``head="largefov"``), output stride 8, crop 320, 20k steps."""
    c = _common(c, crop=320, steps=20000, lr=2.5e-4, weight_decay=5e-4)
    rates = (6, 12, 18, 24) if head == "aspp" else (12,)
    c.model.resnet = dict(output_stride=8, head=head, aspp_rates=rates, head_channels=1024, head_norm="group")
    return c


def deeplab_v3plus(c):
    """DeepLabv3+ ResNet-101, output stride 16, crop 512, 30k steps."""
    c = _common(c, crop=512, steps=30000, lr=0.007, weight_decay=1e-4)
    c.model.resnet = dict(output_stride=16, head="deeplabv3plus", aspp_rates=(6, 12, 18), head_channels=256,
                          low_level_channels=48, head_norm="group")
    return c
