"""The architectures of BackdoorBench and of the BCU authors' code, key for key.

Most backdoored models researchers hold were written by BackdoorBench's attack scripts
(``attack_result.pt``) or by the authors' BCU code (a BackdoorBench v1 fork). Their networks differ
from bcu's own zoo in ways a strict state-dict load notices, so each is re-implemented here with
its exact module tree (same attribute names, registration order, shapes and forward), without
importing torchvision:

=============================  ==============================================================
registered name                what it is
=============================  ==============================================================
``backdoorbench:preactresnet18``  BackdoorBench ``models/preact_resnet.PreActResNet18``: no stem
                               BN, pre-activated blocks with a conv-only projection shortcut,
                               **no final BN/ReLU**, head ``linear``; PyTorch default init
``backdoorbench:resnet18``     torchvision ``resnet18`` (what BackdoorBench's ``resnet18`` builds
                               in every version): 7x7/2 stem + max-pool, ``downsample``, ``fc``
``backdoorbench:vgg11/16/19``, ``backdoorbench:vgg16_bn``, ``backdoorbench:vgg19_bn``
                               torchvision VGG: convs with bias, 7x7 adaptive pool (a 1x1 map
                               at 32x32 is replicated), 25088-4096-4096-n classifier
``backdoorbench:mobilenet_v2`` torchvision MobileNetV2 (ImageNet strides, ``classifier.1``)
``bcu-authors:resnet18``       the authors' ``models/resnet18_DBD.py`` (what their run scripts
                               use, ``--model resnet18``): CIFAR 3x3/1 stem, no max-pool,
                               ``shortcut.0/1``, head ``fc``; kaiming-normal fan-out convs
``bcu-authors:resnet18comp``   their ``models/resnet_comp.py`` (ImageNet-10): the same network with
                               the projection named ``downsample``
``bcu-authors:vgg16``, ``bcu-authors:vgg16bn``
                               their ``models/vgg.py``: a copy of torchvision's VGG (same keys,
                               forward and init) -- aliases of ``backdoorbench:vgg16``/``vgg16_bn``
=============================  ==============================================================

Each family's constructor applies that family's **own initialisation** (the function named in
:data:`FAMILY_INIT`), as the original constructors do, so a freshly built model draws its weights
from the same distribution as a fresh model in their code: this is what the ``authors`` preset of
:mod:`bcu.defenses.authors` mixes into the student. The channel count of the stem follows
``input_shape`` (the originals hard-code 3); every other shape is the original's. PreActResNet18 and
the authors' ResNet-18 also take a ``width`` multiplier (bcu's addition, for CPU-sized experiments;
1 builds the original).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

Shape = Tuple[int, int, int]


# --------------------------------------------------------------------------------------------------
# the families' own initialisations


def init_pytorch_default(model: nn.Module) -> None:
    """PyTorch's ``reset_parameters()`` on every layer (BackdoorBench's PreActResNet18 applies no
    init of its own): conv/linear ``kaiming_uniform_(a=sqrt(5))`` and U(+-1/sqrt(fan_in)) biases,
    BatchNorm weight 1, bias 0 and reset running statistics."""
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def init_torchvision_resnet(model: nn.Module) -> None:
    """torchvision's ResNet init (``zero_init_residual=False``), also the authors' ``resnet18_DBD``
    and ``resnet_comp``: every conv ``kaiming_normal_(mode='fan_out', nonlinearity='relu')``, i.e.
    N(0, sqrt(2 / (C_out k k))); BatchNorm/GroupNorm weight 1, bias 0; the ``fc`` head keeps the
    PyTorch default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def init_torchvision_vgg(model: nn.Module) -> None:
    """torchvision's VGG init (identical in the authors' ``models/vgg.py``): conv
    ``kaiming_normal_(fan_out, relu)`` with bias 0; BatchNorm 1/0; Linear N(0, 0.01) with bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)


def init_torchvision_mobilenet_v2(model: nn.Module) -> None:
    """torchvision's MobileNetV2 init: conv ``kaiming_normal_(mode='fan_out')`` (leaky-ReLU gain with
    slope 0, i.e. sqrt(2)) with bias 0; BatchNorm/GroupNorm 1/0; Linear N(0, 0.01) with bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _planes(width: float) -> List[int]:
    """Stage channels 64/128/256/512 scaled by ``width`` (1 = the original; smaller for CPU experiments)."""
    return [max(1, round(c * width)) for c in (64, 128, 256, 512)]


# --------------------------------------------------------------------------------------------------
# BackdoorBench PreActResNet18 (models/preact_resnet.py; byte-identical in the BCU repo)


class BBPreActBlock(nn.Module):
    """BackdoorBench's ``PreActBlock``: the projection (a 1x1 conv, no BN) takes the pre-activated
    input, the identity takes the raw input; no ReLU after the addition."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:  # no attribute at all for the identity (as the original)
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class BBPreActResNet(nn.Module):
    """``conv1 -> layer1..4 -> avgpool -> linear``: no stem BN and no final BN/ReLU."""

    def __init__(self, num_blocks: Sequence[int], num_classes: int, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        p = _planes(width)
        self.in_planes = p[0]
        self.conv1 = nn.Conv2d(in_channels, p[0], 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(p[0], num_blocks[0], 1)
        self.layer2 = self._make_layer(p[1], num_blocks[1], 2)
        self.layer3 = self._make_layer(p[2], num_blocks[2], 2)
        self.layer4 = self._make_layer(p[3], num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(p[3], num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BBPreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.avgpool(out).view(out.size(0), -1))


# --------------------------------------------------------------------------------------------------
# CIFAR ResNet-18 of the authors (models/resnet18_DBD.py) and its `downsample` twin (resnet_comp.py)


class DBDBasicBlock(nn.Module):
    """The kuangliu/DBD ``BasicBlock``; ``proj`` names the projection (``shortcut`` in resnet18_DBD,
    ``downsample`` in resnet_comp). An identity projection is an empty Sequential (no keys)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, proj: str = "shortcut") -> None:
        super().__init__()
        self.proj = proj
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        seq = nn.Sequential()
        if stride != 1 or in_planes != planes:
            seq = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
        setattr(self, proj, seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + getattr(self, self.proj)(x)
        return F.relu(out)


class DBDResNet(nn.Module):
    """``relu(bn1(conv1)) -> layer1..4 -> avgpool -> flatten -> fc`` with a 3x3/1 stem, no max-pool;
    init: :func:`init_torchvision_resnet` (the ``fc`` head keeps PyTorch's default)."""

    def __init__(self, num_blocks: Sequence[int], num_classes: int, in_channels: int = 3,
                 proj: str = "shortcut", width: float = 1.0) -> None:
        super().__init__()
        p = _planes(width)
        self.in_planes = p[0]
        self.conv1 = nn.Conv2d(in_channels, p[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(p[0])
        self.layer1 = self._make_layer(p[0], num_blocks[0], 1, proj)
        self.layer2 = self._make_layer(p[1], num_blocks[1], 2, proj)
        self.layer3 = self._make_layer(p[2], num_blocks[2], 2, proj)
        self.layer4 = self._make_layer(p[3], num_blocks[3], 2, proj)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(p[3], num_classes)
        init_torchvision_resnet(self)

    def _make_layer(self, planes: int, n: int, stride: int, proj: str) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(DBDBasicBlock(self.in_planes, planes, s, proj))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.avgpool(out), 1))


# --------------------------------------------------------------------------------------------------
# torchvision ResNet-18 (BackdoorBench's `resnet18`)


class TVBasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: ``downsample`` is ``None`` (no keys) or conv1x1 + BN."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class TVResNet(nn.Module):
    """torchvision's ``ResNet`` with ``BasicBlock`` (ImageNet stem: 7x7/2 conv, BN, ReLU, 3x3/2
    max-pool), init :func:`init_torchvision_resnet`."""

    def __init__(self, layers: Sequence[int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], 1)
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        init_torchvision_resnet(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [TVBasicBlock(self.inplanes, planes, stride)]
        self.inplanes = planes
        layers += [TVBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------------------------------
# torchvision VGG (BackdoorBench's vgg*, the authors' models/vgg.py)

VGG_CFGS: Dict[str, List[Union[int, str]]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def vgg_features(cfg: Sequence[Union[int, str]], batch_norm: bool, in_channels: int = 3) -> nn.Sequential:
    """torchvision's ``make_layers``: conv3x3 (with bias) [+ BN] + ReLU, ``'M'`` = 2x2 max-pool."""
    layers: List[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(c, int(v), kernel_size=3, padding=1)
        layers += [conv, nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)] if batch_norm else [conv, nn.ReLU(inplace=True)]
        c = int(v)
    return nn.Sequential(*layers)


class TVVGG(nn.Module):
    """``features -> AdaptiveAvgPool2d((7, 7)) -> flatten -> classifier`` (Linear 25088-4096, ReLU,
    Dropout 0.5, Linear 4096-4096, ReLU, Dropout 0.5, Linear 4096-n), init :func:`init_torchvision_vgg`."""

    def __init__(self, features: nn.Sequential, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes))
        init_torchvision_vgg(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------------------------------
# torchvision MobileNetV2 (BackdoorBench's mobilenet_v2)


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNReLU6(nn.Sequential):
    """torchvision's ``Conv2dNormActivation`` (the former ``ConvBNReLU``): keys ``0`` (conv, no bias)
    and ``1`` (BN), ReLU6 at index 2."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class TVInvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel_size=1))
        layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class TVMobileNetV2(nn.Module):
    """torchvision's MobileNetV2 at width 1 (stem stride 2), init :func:`init_torchvision_mobilenet_v2`."""

    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1))

    def __init__(self, num_classes: int, in_channels: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        cin = _make_divisible(32)
        self.last_channel = _make_divisible(1280)
        features: List[nn.Module] = [ConvBNReLU6(in_channels, cin, stride=2)]
        for t, c, n, s in self.SETTING:
            cout = _make_divisible(c)
            for i in range(n):
                features.append(TVInvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvBNReLU6(cin, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        init_torchvision_mobilenet_v2(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------------------------------
# registration


def _channels(input_shape: Sequence[int]) -> int:
    return int(input_shape[0])


@register_model("backdoorbench:preactresnet18")
def bb_preactresnet18(num_classes: int = 10, input_shape: Shape = (3, 32, 32), width: float = 1.0) -> BBPreActResNet:
    """BackdoorBench PreActResNet18 (no final BN, head 'linear'; PyTorch default init); ``width`` 1 = the original."""
    return BBPreActResNet((2, 2, 2, 2), num_classes, _channels(input_shape), width)


@register_model("backdoorbench:resnet18")
def bb_resnet18(num_classes: int = 10, input_shape: Shape = (3, 32, 32)) -> TVResNet:
    """BackdoorBench resnet18 = torchvision ResNet-18 (7x7/2 stem, max-pool, 'downsample', 'fc')."""
    return TVResNet((2, 2, 2, 2), num_classes, _channels(input_shape))


def _vgg(cfg: str, bn: bool, num_classes: int, input_shape: Shape) -> TVVGG:
    return TVVGG(vgg_features(VGG_CFGS[cfg], bn, _channels(input_shape)), num_classes)


@register_model("backdoorbench:vgg11")
def bb_vgg11(num_classes: int = 10, input_shape: Shape = (3, 32, 32)) -> TVVGG:
    """BackdoorBench vgg11 = torchvision VGG-11 (7x7 adaptive pool, 4096-4096 classifier)."""
    return _vgg("A", False, num_classes, input_shape)


@register_model("backdoorbench:vgg16")
def bb_vgg16(num_classes: int = 10, input_shape: Shape = (3, 32, 32)) -> TVVGG:
    """BackdoorBench vgg16 = torchvision VGG-16 (7x7 adaptive pool, 4096-4096 classifier)."""
    return _vgg("D", False, num_classes, input_shape)


@register_model("backdoorbench:vgg19")
def bb_vgg19(num_classes: int = 10, input_shape: Shape = (3, 32, 32)) -> TVVGG:
    """BackdoorBench vgg19 = torchvision VGG-19 (7x7 adaptive pool, 4096-4096 classifier)."""
    return _vgg("E", False, num_classes, input_shape)


@register_model("backdoorbench:vgg16_bn")
def bb_vgg16_bn(num_classes: int = 10, input_shape: Shape = (3, 32, 32)) -> TVVGG:
    """torchvision VGG-16-BN (the authors' vgg16bn; BackdoorBench builds it with the same keys)."""
    return _vgg("D", True, num_classes, input_shape)


@register_model("backdoorbench:vgg19_bn")
def bb_vgg19_bn(num_classes: int = 10, input_shape: Shape = (3, 32, 32)) -> TVVGG:
    """BackdoorBench vgg19_bn = torchvision VGG-19-BN (v2.x)."""
    return _vgg("E", True, num_classes, input_shape)


@register_model("backdoorbench:mobilenet_v2")
def bb_mobilenet_v2(num_classes: int = 10, input_shape: Shape = (3, 32, 32)) -> TVMobileNetV2:
    """BackdoorBench mobilenet_v2 = torchvision MobileNetV2 (stem stride 2, 'classifier.1')."""
    return TVMobileNetV2(num_classes, _channels(input_shape))


@register_model("bcu-authors:resnet18")
def authors_resnet18(num_classes: int = 10, input_shape: Shape = (3, 32, 32), width: float = 1.0) -> DBDResNet:
    """The BCU authors' CIFAR ResNet-18 (resnet18_DBD: 3x3 stem, 'shortcut.0/1', head 'fc'); ``width`` 1 = the original."""
    return DBDResNet((2, 2, 2, 2), num_classes, _channels(input_shape), "shortcut", width)


@register_model("bcu-authors:resnet18comp")
def authors_resnet18comp(num_classes: int = 10, input_shape: Shape = (3, 32, 32)) -> DBDResNet:
    """The BCU authors' resnet_comp ResNet-18 (3x3 stem, 'downsample', head 'fc'; ImageNet-10)."""
    return DBDResNet((2, 2, 2, 2), num_classes, _channels(input_shape), "downsample")


@register_model("bcu-authors:vgg16")
def authors_vgg16(num_classes: int = 10, input_shape: Shape = (3, 32, 32)) -> TVVGG:
    """The BCU authors' vgg16 (a copy of torchvision's; same as backdoorbench:vgg16)."""
    return _vgg("D", False, num_classes, input_shape)


@register_model("bcu-authors:vgg16bn")
def authors_vgg16bn(num_classes: int = 10, input_shape: Shape = (3, 32, 32)) -> TVVGG:
    """The BCU authors' vgg16bn (a copy of torchvision's; same as backdoorbench:vgg16_bn)."""
    return _vgg("D", True, num_classes, input_shape)


#: registered name -> the initialisation its constructor applies (a fresh model's distribution)
FAMILY_INIT: Dict[str, Callable[[nn.Module], None]] = {
    "backdoorbench:preactresnet18": init_pytorch_default,
    "backdoorbench:resnet18": init_torchvision_resnet,
    "backdoorbench:vgg11": init_torchvision_vgg,
    "backdoorbench:vgg16": init_torchvision_vgg,
    "backdoorbench:vgg19": init_torchvision_vgg,
    "backdoorbench:vgg16_bn": init_torchvision_vgg,
    "backdoorbench:vgg19_bn": init_torchvision_vgg,
    "backdoorbench:mobilenet_v2": init_torchvision_mobilenet_v2,
    "bcu-authors:resnet18": init_torchvision_resnet,
    "bcu-authors:resnet18comp": init_torchvision_resnet,
    "bcu-authors:vgg16": init_torchvision_vgg,
    "bcu-authors:vgg16bn": init_torchvision_vgg,
}

#: names that build the very same network (keys, forward and init) as another registered name
ALIASES: Dict[str, str] = {"bcu-authors:vgg16": "backdoorbench:vgg16", "bcu-authors:vgg16bn": "backdoorbench:vgg16_bn"}


def family_init(arch: str) -> Callable[[nn.Module], None]:
    """The initialisation a fresh ``arch`` model gets from its own constructor: the function above
    for these families, PyTorch's defaults for bcu's own zoo (whose constructors apply no init,
    except the ViT's truncated-normal class token, which is not mixed by name rules)."""
    return FAMILY_INIT.get(arch.lower(), init_pytorch_default)
