"""DeepLab-ResNet backbones in Flax NNX: ResNet-50/101 with output stride 8/16/32 and a DeepLab head.

The encoder is torchvision's ResNet (v1.5 bottlenecks: the stride sits in the 3x3 conv;
timm's ``resnet50`` / ``resnet101`` share the layout and the parameter names), so its
weights load from a torchvision or timm checkpoint with
:func:`rwseg.models.backbones.load_torch_weights`. The attribute tree mirrors torch's
names: ``encoder.conv1``, ``encoder.bn1``, ``encoder.layer3[5].conv2``,
``encoder.layer1[0].downsample[0]`` (= ``layer1.0.downsample.0.weight``), ...

* **Output stride by dilation** (DeepLab's recipe, Chen et al. 2017 §3.1; torchvision's
  ``replace_stride_with_dilation``): for output stride 16 ``layer4`` keeps stride 1 and
  dilates its 3x3 convs by 2, for 8 ``layer3`` too (dilation 2, ``layer4`` 4). As in
  torchvision, the first block of a dilated stage keeps the previous dilation.
* **Frozen BatchNorm**: each BatchNorm is a fixed per-channel affine ``x * scale + bias``
  (``scale = gamma / sqrt(var + eps)``, ``bias = beta - mean * scale`` from the checkpoint's
  running statistics), stored as :class:`FrozenAffine` variables (a
  :class:`rwseg.layers.statistic.Statistic`: checkpointed, never trained, no batch statistics),
  so the train step stays a pure function of (params, batch) whatever the per-device
  batch. Freshly built, the affine is the identity (``scale = 1``, ``bias = 0``): the
  backbones are meant to start from a pretrained checkpoint.
* **Heads** (``head``), freshly initialised, normalised with GroupNorm (``head_norm``):

  - ``"aspp"`` — DeepLab-v2's ASPP (Chen et al. 2017, Fig. 4): parallel 3x3 convs dilated by
    ``aspp_rates`` (the paper's (6, 12, 18, 24)) from ``layer4`` straight to the classes,
    summed. ``features`` are ``layer4`` (2048 channels).
  - ``"largefov"`` — DeepLab-LargeFOV (Chen et al. 2015): a 3x3 conv dilated by
    ``aspp_rates[0]`` (12) to ``head_channels`` (1024), a 1x1 conv (fc7), the 1x1 classifier;
    ``features`` are fc7's output.
  - ``"deeplabv3plus"`` — DeepLabv3+ (Chen et al. 2018): ASPP (a 1x1 conv, 3x3 convs dilated
    by ``aspp_rates`` — (6, 12, 18) at output stride 16, doubled at 8 — and image pooling,
    ``head_channels`` each, a 1x1 projection), upsampled to ``layer1``, concatenated with
    ``layer1`` reduced to ``low_level_channels`` (48), two 3x3 convs: the decoder ``features``
    at stride 4; the 1x1 classifier.

Geometry: every conv pads symmetrically as torch does (``padding = dilation * (k - 1) / 2``),
so a stride-s map has ``ceil(H / s)`` cells and its cell i is centred on input pixel
``s * i`` whatever the parity of H: :func:`level_grid` gives ``Grid(s, -(s - 1) / 2)``.

``ResNet.__call__(images)`` returns the interface of :class:`rwseg.models.backbone.Backbone`
(``stem``, ``features``, ``logits``, with :meth:`ResNet.grid`, ``stem_channels``,
``num_features``, ``num_classes``) plus every encoder level (``conv1``, ``layer1`` ..
``layer4``). ``stem`` is ``conv1``'s output (after its BatchNorm and ReLU, before the max
pool: the first-layer features of RWN's affinity branch and SPN's guidance) resampled from
its stride-2 grid to the image pixels.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rwseg.layers.convs import ConvBlock
from rwseg.layers.grid import Grid, upsample
from rwseg.layers.statistic import Statistic

__all__ = ["FrozenAffine", "FrozenBatchNorm", "Bottleneck", "ResNetEncoder", "ResNet", "BLOCKS", "HEADS",
           "OUTPUT_STRIDES", "LEVELS", "level_grid", "stage_dilations"]

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}  # bottleneck blocks per stage (He et al. 2016, Table 1)
HEADS = ("aspp", "largefov", "deeplabv3plus")
OUTPUT_STRIDES = (8, 16, 32)
LEVELS = ("conv1", "layer1", "layer2", "layer3", "layer4")
EXPANSION = 4


class FrozenAffine(Statistic):
    """A frozen BatchNorm's per-channel scale or bias: a constant of the pretrained network
    (checkpointed with the model, never trained)."""


def level_grid(level: str, output_stride: int = 32) -> Grid:
    """The :class:`Grid` (both axes) of an encoder level.

    Args:
      level: one of :data:`LEVELS`.
      output_stride: the encoder's output stride (8, 16 or 32).

    Returns:
      ``Grid(s, -(s - 1) / 2)`` with s the level's stride (2, 4, 8, then ``min(16, output_stride)``
      and ``output_stride``): cell i is centred on pixel ``s * i`` (torch's symmetric padding).
    """
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {LEVELS}, got {level!r}")
    strides = {"conv1": 2, "layer1": 4, "layer2": 8, "layer3": min(16, output_stride), "layer4": output_stride}
    s = strides[level]
    return Grid(float(s), -(s - 1) / 2.0)


def stage_dilations(output_stride: int) -> tuple[tuple[int, int, int], ...]:
    """Per stage (layer1..layer4): (stride, dilation of the first block, dilation of the others).

    torchvision's ``replace_stride_with_dilation``: a dilated stage has stride 1 and multiplies
    the running dilation by the stride it dropped; its first block keeps the previous dilation.

    Args:
      output_stride: 8, 16 or 32 (:data:`OUTPUT_STRIDES`).

    Returns:
      Four ``(stride, first_dilation, dilation)`` tuples, layer1 first.
    """
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride: expected one of {OUTPUT_STRIDES}, got {output_stride!r}")
    dilate = {8: (False, False, True, True), 16: (False, False, False, True), 32: (False,) * 4}[output_stride]
    out, dilation = [], 1
    for i, d in enumerate(dilate):
        stride = 1 if i == 0 else 2
        previous = dilation
        if d:
            dilation *= stride
            stride = 1
        out.append((stride, previous, dilation))
    return tuple(out)


def _conv(cin, cout, kernel, *, stride=1, dilation=1, rngs):
    """A bias-free conv with torch's symmetric padding (``dilation * (kernel - 1) // 2``) and
    torchvision's He (fan-out) initialisation."""
    pad = dilation * (kernel - 1) // 2
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                    kernel_dilation=dilation, use_bias=False,
                    kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"), rngs=rngs)


class FrozenBatchNorm(nnx.Module):
    """BatchNorm with fixed statistics: ``x * scale + bias`` per channel (no mutable state).

    Args:
      channels: the number of channels C.

    ``__call__(x)``: (..., C) -> (..., C). ``scale`` / ``bias`` are :class:`FrozenAffine`
    (identity until loaded from a checkpoint).
    """

    def __init__(self, channels: int):
        self.scale = FrozenAffine(jnp.ones((channels,), jnp.float32))
        self.bias = FrozenAffine(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x):
        return x * self.scale[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class Bottleneck(nnx.Module):
    """torchvision's ``Bottleneck`` (1x1, 3x3 with the stride and dilation, 1x1 x4; v1.5).

    Args:
      cin: input channels.
      planes: the 3x3 conv's channels (the output has ``4 * planes``).
      stride: the 3x3 conv's (and the projection's) stride.
      dilation: the 3x3 conv's dilation (its padding equals it).
      rngs: the initialisers' keys.

    ``__call__(x)``: (B, H, W, cin) -> (B, ceil(H / stride), ceil(W / stride), 4 planes).
    """

    def __init__(self, cin: int, planes: int, *, stride: int = 1, dilation: int = 1, rngs: nnx.Rngs):
        cout = planes * EXPANSION
        self.conv1, self.bn1 = _conv(cin, planes, 1, rngs=rngs), FrozenBatchNorm(planes)
        self.conv2 = _conv(planes, planes, 3, stride=stride, dilation=dilation, rngs=rngs)
        self.bn2 = FrozenBatchNorm(planes)
        self.conv3, self.bn3 = _conv(planes, cout, 1, rngs=rngs), FrozenBatchNorm(cout)
        self.downsample = (nnx.List([_conv(cin, cout, 1, stride=stride, rngs=rngs), FrozenBatchNorm(cout)])
                           if stride != 1 or cin != cout else None)

    def __call__(self, x):
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        identity = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        return jax.nn.relu(y + identity)


def _max_pool(x):
    """torch's ``MaxPool2d(3, stride=2, padding=1)`` (padding never wins: -inf)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


class ResNetEncoder(nnx.Module):
    """torchvision's ResNet trunk (no pooling / fc) with DeepLab's dilation.

    Args:
      blocks: bottleneck blocks per stage, e.g. ``BLOCKS[101] = (3, 4, 23, 3)``.
      output_stride: 8, 16 or 32 (see :func:`stage_dilations`).
      in_channels: image channels.
      rngs: the initialisers' keys.

    ``__call__(images)`` with images (B, H, W, in_channels) returns ``{"conv1": (B, H/2, W/2, 64),
    "layer1": (.., H/4, .., 256), "layer2": (.., H/8, .., 512), "layer3": 1024 channels,
    "layer4": 2048 channels}`` (sizes rounded up), on the grids of :func:`level_grid`.
    """

    OUT_CHANNELS = 64 * 2 ** 3 * EXPANSION  # layer4: 512 planes x the bottleneck's expansion

    def __init__(self, blocks: Sequence[int], *, output_stride: int = 8, in_channels: int = 3, rngs: nnx.Rngs):
        blocks = tuple(int(b) for b in blocks)
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks: expected 4 stage sizes >= 1, got {blocks!r}")
        self.blocks, self.output_stride = blocks, int(output_stride)
        self.conv1 = nnx.Conv(in_channels, 64, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False,
                              kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"), rngs=rngs)
        self.bn1 = FrozenBatchNorm(64)
        cin = 64
        for i, (n, (stride, first, rest)) in enumerate(zip(blocks, stage_dilations(self.output_stride))):
            planes = 64 * 2 ** i
            stage = [Bottleneck(cin, planes, stride=stride, dilation=first, rngs=rngs)]
            stage += [Bottleneck(planes * EXPANSION, planes, dilation=rest, rngs=rngs) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nnx.List(stage))
            cin = planes * EXPANSION
        self.out_channels = cin
        assert cin == self.OUT_CHANNELS, (cin, self.OUT_CHANNELS)

    def __call__(self, images):
        x = jax.nn.relu(self.bn1(self.conv1(images)))
        out = {"conv1": x}
        x = _max_pool(x)
        for name in LEVELS[1:]:
            for block in getattr(self, name):
                x = block(x)
            out[name] = x
        return out


class _ASPPv2(nnx.Module):
    """DeepLab-v2 ASPP: sum of 3x3 convs (dilations ``rates``) straight to the classes."""

    def __init__(self, cin, num_classes, rates, *, rngs):
        self.branches = nnx.List([nnx.Conv(cin, num_classes, (3, 3), kernel_dilation=int(r), rngs=rngs)
                                  for r in rates])

    def __call__(self, levels):
        x = levels["layer4"]
        return x, sum(branch(x) for branch in self.branches)


class _LargeFOV(nnx.Module):
    """DeepLab-LargeFOV: fc6 (3x3, dilation ``rate``), fc7 (1x1), fc8 (1x1 classifier)."""

    def __init__(self, cin, num_classes, rate, channels, norm, *, rngs):
        self.fc6 = ConvBlock(cin, channels, dilation=int(rate), norm=norm, rngs=rngs)
        self.fc7 = ConvBlock(channels, channels, kernel=1, norm=norm, rngs=rngs)
        self.classifier = nnx.Conv(channels, num_classes, (1, 1), rngs=rngs)

    def __call__(self, levels):
        feats = self.fc7(self.fc6(levels["layer4"]))
        return feats, self.classifier(feats)


class _DeepLabV3Plus(nnx.Module):
    """DeepLabv3+: ASPP with image pooling on layer4, a decoder with layer1 at stride 4."""

    def __init__(self, cin, num_classes, rates, channels, low_level_channels, norm, output_stride, *, rngs):
        self.output_stride = output_stride
        self.aspp = nnx.List([ConvBlock(cin, channels, kernel=1, norm=norm, rngs=rngs)]
                             + [ConvBlock(cin, channels, dilation=int(r), norm=norm, rngs=rngs) for r in rates])
        self.pooling = ConvBlock(cin, channels, kernel=1, norm=norm, rngs=rngs)
        self.project = ConvBlock(channels * (len(rates) + 2), channels, kernel=1, norm=norm, rngs=rngs)
        self.reduce = ConvBlock(64 * EXPANSION, low_level_channels, kernel=1, norm=norm, rngs=rngs)
        self.decoder = nnx.List([ConvBlock(channels + low_level_channels, channels, norm=norm, rngs=rngs),
                                 ConvBlock(channels, channels, norm=norm, rngs=rngs)])
        self.classifier = nnx.Conv(channels, num_classes, (1, 1), rngs=rngs)

    def __call__(self, levels):
        x, low = levels["layer4"], levels["layer1"]
        pooled = self.pooling(jnp.mean(x, axis=(1, 2), keepdims=True))
        branches = [branch(x) for branch in self.aspp] + [jnp.broadcast_to(pooled, x.shape[:3] + pooled.shape[3:])]
        x = self.project(jnp.concatenate(branches, axis=-1))
        x = upsample(x, low.shape[1:3], level_grid("layer4", self.output_stride), level_grid("layer1"))
        x = jnp.concatenate([x, self.reduce(low)], axis=-1)
        for block in self.decoder:
            x = block(x)
        return x, self.classifier(x)


class ResNet(nnx.Module):
    """A DeepLab-ResNet: :class:`ResNetEncoder` + a DeepLab head, with rwseg's backbone interface.

    Args:
      num_classes: logits channels.
      depth: 50 or 101 (:data:`BLOCKS`); ``config.model.backbone = "resnet50" | "resnet101"``.
      output_stride: 8, 16 or 32 (dilation in layer3/layer4, :func:`stage_dilations`).
      head: one of :data:`HEADS` (see the module docstring).
      aspp_rates: the head's dilation rates (``"largefov"`` uses the first; ``"aspp"``: the
        paper's (6, 12, 18, 24) at output stride 8; ``"deeplabv3plus"``: (6, 12, 18) at
        stride 16, (12, 24, 36) at 8).
      head_channels: channels of the LargeFOV / DeepLabv3+ head (1024 / 256 in the papers);
        unused by ``"aspp"``.
      low_level_channels: the DeepLabv3+ decoder's reduction of ``layer1`` (48).
      head_norm: ``"group"`` or ``"none"``: the head's normalisation (GroupNorm over
        min(8, C) groups; a fresh head has no BatchNorm statistics to freeze).
      blocks: bottleneck blocks per stage; ``None`` = ``BLOCKS[depth]``.
      in_channels: image channels.
      rngs: the initialisers' keys.

    ``__call__(images)`` with images (B, H, W, in_channels) (normalised by ImageNet's mean and
    std, as :func:`rwseg.data.make_batches` gives them and torchvision expects) returns a dict:
      ``stem``: (B, H, W, 64) conv1's features resampled to the image pixels;
      ``features``: (B, h, w, num_features) the head's features on :meth:`grid`;
      ``logits``: (B, h, w, num_classes) on :meth:`grid`;
      ``conv1`` .. ``layer4``: the encoder levels (:class:`ResNetEncoder`), on :func:`level_grid`.
    """

    STEM_CHANNELS = 64  # conv1's channels: the ``stem`` features

    def __init__(self, num_classes: int, *, depth: int = 101, output_stride: int = 8, head: str = "aspp",
                 aspp_rates: Sequence[int] = (6, 12, 18, 24), head_channels: int = 256,
                 low_level_channels: int = 48, head_norm: str = "group", blocks: Sequence[int] | None = None,
                 in_channels: int = 3, rngs: nnx.Rngs):
        if blocks is None:
            if depth not in BLOCKS:
                raise ValueError(f"depth: expected one of {sorted(BLOCKS)}, got {depth!r}")
            blocks = BLOCKS[depth]
        if head not in HEADS:
            raise ValueError(f"head: expected one of {HEADS}, got {head!r}")
        rates = tuple(int(r) for r in aspp_rates)
        if not rates or min(rates) < 1:
            raise ValueError(f"aspp_rates: expected a non-empty tuple of ints >= 1, got {aspp_rates!r}")
        self.encoder = ResNetEncoder(blocks, output_stride=output_stride, in_channels=in_channels, rngs=rngs)
        cin = self.encoder.out_channels
        if head == "aspp":
            self.head, self.num_features = _ASPPv2(cin, num_classes, rates, rngs=rngs), cin
        elif head == "largefov":
            self.head = _LargeFOV(cin, num_classes, rates[0], int(head_channels), head_norm, rngs=rngs)
            self.num_features = int(head_channels)
        else:
            self.head = _DeepLabV3Plus(cin, num_classes, rates, int(head_channels), int(low_level_channels),
                                       head_norm, int(output_stride), rngs=rngs)
            self.num_features = int(head_channels)
        self.head_name, self.output_stride = head, int(output_stride)
        self.num_classes, self.stem_channels = num_classes, self.STEM_CHANNELS

    def grid(self, size_hw) -> tuple[Grid, Grid]:
        """Where the cells of ``features`` / ``logits`` sit on the image: ``layer1``'s grid for
        ``"deeplabv3plus"``, else ``layer4``'s.

        Args:
          size_hw: the image's ``(H, W)`` (any size; the grid depends on the strides only).

        Returns:
          ``(rows, cols)`` :class:`Grid` pair.
        """
        g = level_grid("layer1" if self.head_name == "deeplabv3plus" else "layer4", self.output_stride)
        return g, g

    def __call__(self, images):
        levels = self.encoder(images)
        feats, logits = self.head(levels)
        stem = upsample(levels["conv1"], images.shape[1:3], level_grid("conv1"))
        return {"stem": stem, "features": feats, "logits": logits, **levels}
