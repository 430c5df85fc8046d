"""Backbones: :func:`create_backbone` builds any timm model by name, and the package adds
``resnet18_cifar`` to timm's registry.

The CIFAR variant of ResNet-18 (as in the RKR and Mask-RKR CIFAR-100 experiments):
timm's ResNet-18 with a 3x3 stride-1 stem convolution and no max-pool, for 32x32 inputs.
"""
from __future__ import annotations

import timm
from timm.models import ResNet, register_model
from timm.models.resnet import BasicBlock
from torch import nn


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 for 32x32 images: 3x3 stride-1 stem, no max-pool (no pretrained weights)."""
    if pretrained:
        raise ValueError("resnet18_cifar has no pretrained weights; pass a weights file")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    model = ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)
    model.conv1 = nn.Conv2d(model.conv1.in_channels, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def create_backbone(name: str, num_classes: int, img_size: int | None = None,
                    **kwargs) -> nn.Module:
    """A timm model (or ``resnet18_cifar``) with random weights; ``img_size`` is passed
    to models that take one (ViT, Swin) and ignored by the others (CNNs)."""
    if img_size is not None:
        try:
            return timm.create_model(name, num_classes=num_classes, img_size=img_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return timm.create_model(name, num_classes=num_classes, **kwargs)
