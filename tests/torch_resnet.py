"""A reference ResNet in plain torch.nn with torchvision's architecture and parameter names.

torchvision itself does not import beside the ``torch==2.13.0+cpu`` wheel these tests use
(``operator torchvision::nms does not exist``), so this file rebuilds
``torchvision.models.resnet`` (v1.5 ``Bottleneck``, ``_make_layer`` with
``replace_stride_with_dilation``) line for line, test-only: its ``state_dict()`` has
torchvision's keys (``conv1.weight``, ``layer1.0.downsample.1.running_var``, ``fc.weight``, ...).
"""

import torch
from torch import nn


def conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, layers, num_classes=1000, replace_stride_with_dilation=None):
        super().__init__()
        self.inplanes, self.dilation, self.groups, self.base_width = 64, 1, 1, 64
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes, blocks, stride=1, dilate=False):
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * Bottleneck.expansion, stride),
                                       nn.BatchNorm2d(planes * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                             previous_dilation)]
        self.inplanes = planes * Bottleneck.expansion
        for _ in range(1, blocks):
            layers.append(Bottleneck(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                     dilation=self.dilation))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.levels(x)["layer4"]
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def levels(self, x):
        """{"conv1", "layer1", ..., "layer4"}: the features after each stage (NCHW)."""
        out = {}
        x = self.relu(self.bn1(self.conv1(x)))
        out["conv1"] = x
        x = self.maxpool(x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            out[name] = x
        return out


def resnet(blocks, output_stride=32, seed=0):
    """A randomly initialised reference ResNet (eval mode) with ``blocks`` bottlenecks per stage
    ([3, 4, 6, 3]: ResNet-50, [3, 4, 23, 3]: ResNet-101) for ``output_stride`` 8/16/32.

    Its BatchNorms get random affines (the residual branches' last ones small, as in trained
    ResNets) and the running statistics of one random calibration batch (as training leaves
    them), so that the features stay O(1) through 100 layers, float32 rounding is not
    amplified block after block, and folding the statistics is exercised."""
    torch.manual_seed(seed)
    dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}[output_stride]
    model = ResNet(list(blocks), replace_stride_with_dilation=dilate)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                # a residual branch's last BatchNorm scales it down (as in trained ResNets)
                low, high = (0.1, 0.4) if name.endswith("bn3") else (0.5, 1.5)
                m.weight.copy_(low + (high - low) * torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.momentum = 1.0  # the calibration batch's statistics become the running ones
        model.train().levels(torch.randn(4, 3, 48, 48, generator=g))
    return model.eval()


def with_stride(state_dict, blocks, output_stride):
    """The reference ResNet of ``state_dict`` built for ``output_stride`` (no initialisation cost)."""
    dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}[output_stride]
    with torch.device("meta"):
        model = ResNet(list(blocks), replace_stride_with_dilation=dilate)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state_dict)
    return model.eval()
