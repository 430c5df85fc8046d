"""Input pipelines: dataset defaults, or size and normalisation of a timm backbone.

The image size, normalisation and eval crop ratio a backbone expects are read
from its timm pretrained configuration (no weights are downloaded). Explicit
arguments always win over the backbone, which wins over the dataset defaults.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import timm
import torch.nn as nn
from timm.data import resolve_data_config
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

MeanStd = tuple[Sequence[float], Sequence[float]]
"""Per-channel ``(mean, std)`` used by ``Normalize``."""

Backbone = Union[str, nn.Module]
"""A timm model name (``"vit_base_patch16_224.augreg_in21k"``) or a model
holding a timm ``pretrained_cfg`` (itself or one of its submodules)."""

IMAGENET_MEAN_STD: MeanStd = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class InputSpec(NamedTuple):
    """What a pipeline must produce: square ``image_size`` crops normalised with
    ``mean_std``; eval images are resized to ``image_size / crop_pct`` first."""

    image_size: int
    mean_std: MeanStd
    crop_pct: float = 0.875
    interpolation: InterpolationMode = InterpolationMode.BILINEAR


IMAGENET_SPEC = InputSpec(224, IMAGENET_MEAN_STD)


def _pretrained_cfg(backbone: Backbone) -> dict:
    """timm pretrained configuration of a model name or of a model."""
    if isinstance(backbone, str):
        cfg = timm.get_pretrained_cfg(backbone)
        if cfg is None:
            raise ValueError(
                f"timm has no pretrained configuration for {backbone!r}; "
                "pass a timm model name such as 'vit_base_patch16_224'"
            )
        return cfg.to_dict()
    if isinstance(backbone, nn.Module):
        for module in backbone.modules():
            cfg = getattr(module, "pretrained_cfg", None)
            if cfg:
                return dict(cfg)
        raise ValueError(
            f"{type(backbone).__name__} holds no timm `pretrained_cfg`; "
            "pass image_size and mean_std explicitly"
        )
    raise TypeError(
        f"backbone must be a timm model name or an nn.Module, got {type(backbone)}"
    )


def resolve_input_spec(
    backbone: Backbone | None = None,
    image_size: int | None = None,
    mean_std: MeanStd | None = None,
    default: InputSpec = IMAGENET_SPEC,
) -> InputSpec:
    """Input spec from explicit arguments, else ``backbone``'s timm config,
    else ``default``."""
    spec = default
    if backbone is not None:
        cfg = resolve_data_config(pretrained_cfg=_pretrained_cfg(backbone))
        spec = InputSpec(
            image_size=int(cfg["input_size"][-1]),
            mean_std=(tuple(cfg["mean"]), tuple(cfg["std"])),
            crop_pct=float(cfg["crop_pct"]),
            interpolation=InterpolationMode(cfg["interpolation"]),
        )
    return spec._replace(
        image_size=spec.image_size if image_size is None else image_size,
        mean_std=spec.mean_std if mean_std is None else mean_std,
    )


def to_normalized_tensor(steps: Sequence, mean_std: MeanStd) -> T.Compose:
    """``Compose(steps + [ToTensor, Normalize(mean_std)])``: PIL image -> (3, H, W)."""
    return T.Compose([*steps, T.ToTensor(), T.Normalize(*mean_std)])


def backbone_transforms(
    model_or_name: Backbone | None = None,
    image_size: int | None = None,
    train: bool = True,
    mean_std: MeanStd | None = None,
) -> T.Compose:
    """ImageNet-style pipeline for a backbone: PIL image -> (3, S, S) tensor.

    Args:
        model_or_name: timm model or name whose pretrained configuration gives
            size, normalisation, eval crop ratio and interpolation; ``None``
            uses ImageNet defaults (224, ImageNet mean/std, crop ratio 0.875).
        image_size: output side ``S``, overriding the backbone's.
        train: ``RandomResizedCrop(S)`` + horizontal flip if True, else
            ``Resize(S / crop_pct)`` + ``CenterCrop(S)``.
        mean_std: normalisation overriding the backbone's.
    """
    spec = resolve_input_spec(model_or_name, image_size, mean_std)
    size, interp = spec.image_size, spec.interpolation
    if train:
        steps = [
            T.RandomResizedCrop(size, interpolation=interp),
            T.RandomHorizontalFlip(),
        ]
    else:
        steps = [
            T.Resize(round(size / spec.crop_pct), interpolation=interp),
            T.CenterCrop(size),
        ]
    return to_normalized_tensor(steps, spec.mean_std)
