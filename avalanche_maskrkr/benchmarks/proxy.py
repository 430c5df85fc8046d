"""A pretrained proxy, offline: a small timm backbone trained on synthetic shapes.

The paper's setting is a frozen ImageNet-pretrained backbone; without a network no such
weights can be had. A proxy stands in: a backbone trained until converged on *other*
data (12 classes of synthetic strokes and shapes, :func:`synthetic_shapes`), saved as a
``.safetensors`` file, then reloaded and frozen to learn new tasks (e.g.
:func:`~.digits.split_digits` at the same size). Its features are good but not made
for the new tasks, as an ImageNet backbone's are for a downstream dataset, so a linear
probe on them is a meaningful reference.
"""
from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .transforms import resolve_input_spec

SHAPES = ("line 0", "line 45", "line 90", "line 135", "ring", "disk", "square", "box",
          "plus", "cross", "corner", "two lines")
"""The classes of :func:`synthetic_shapes`."""


def _segment(xx, yy, cx, cy, angle, length, width):
    """Distance-based ink of a segment: (n, S, S) in [0, 1]."""
    dx, dy = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    px, py = xx - cx[:, None, None], yy - cy[:, None, None]
    along = px * dx + py * dy
    across = (-px * dy + py * dx).abs()
    half = length[:, None, None] / 2
    dist = torch.maximum(across, (along.abs() - half).clamp(min=0))
    return (1 - (dist - width[:, None, None]).clamp(min=0) / 0.04).clamp(0, 1)


def synthetic_shapes(n: int, image_size: int = 32, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` grey images of strokes and shapes at random places, sizes and widths, with
    noise: ((n, 3, S, S) float32 in [0, 1], (n,) labels in ``0..len(SHAPES)-1``)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(low, high):
        return low + (high - low) * torch.rand(n, generator=g)

    labels = torch.randint(len(SHAPES), (n,), generator=g)
    axis = torch.linspace(-1, 1, image_size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    cx, cy = uniform(-0.3, 0.3), uniform(-0.3, 0.3)
    size, width = uniform(0.35, 0.7), uniform(0.04, 0.12)
    jitter = uniform(-0.2, 0.2)
    radius = torch.sqrt((xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2)
    box = torch.maximum((xx - cx[:, None, None]).abs(), (yy - cy[:, None, None]).abs())
    s, w = size[:, None, None], width[:, None, None]
    ink = {
        **{f"line {a}": _segment(xx, yy, cx, cy, math.radians(a) + jitter, 2 * size, width)
           for a in (0, 45, 90, 135)},
        "ring": (1 - ((radius - s).abs() - w).clamp(min=0) / 0.04).clamp(0, 1),
        "disk": (1 - (radius - s).clamp(min=0) / 0.04).clamp(0, 1),
        "square": (1 - ((box - s).abs() - w).clamp(min=0) / 0.04).clamp(0, 1),
        "box": (1 - (box - s).clamp(min=0) / 0.04).clamp(0, 1),
        "plus": torch.maximum(_segment(xx, yy, cx, cy, jitter, 2 * size, width),
                              _segment(xx, yy, cx, cy, jitter + math.pi / 2, 2 * size, width)),
        "cross": torch.maximum(
            _segment(xx, yy, cx, cy, jitter + math.pi / 4, 2 * size, width),
            _segment(xx, yy, cx, cy, jitter + 3 * math.pi / 4, 2 * size, width)),
        "corner": torch.maximum(
            _segment(xx, yy, cx + size / 2, cy, jitter, size, width),
            _segment(xx, yy, cx, cy + size / 2, jitter + math.pi / 2, size, width)),
        "two lines": torch.maximum(
            _segment(xx, yy, cx - size / 2, cy, jitter + math.pi / 2, 2 * size, width),
            _segment(xx, yy, cx + size / 2, cy, jitter + math.pi / 2, 2 * size, width)),
    }
    stacked = torch.stack([ink[name] for name in SHAPES], 1)  # (n, classes, S, S)
    images = stacked[torch.arange(n), labels]
    images = (images + 0.1 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    return images[:, None].expand(-1, 3, -1, -1).contiguous(), labels


def pretrain_proxy(model_name: str, path: str | Path, image_size: int = 32,
                   samples: int = 6000, epochs: int = 6, seed: int = 0,
                   **model_kwargs) -> Path:
    """Train timm's ``model_name`` on :func:`synthetic_shapes` (Adam 2e-3, cosine
    schedule, batch 64, inputs normalised with the model's mean/std), save its weights to
    ``path`` (``.safetensors``) and return the path.

    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``img_size`` and ``patch_size``
    for a ViT); pass the same when loading the weights.
    """
    torch.manual_seed(seed)
    model = timm.create_model(model_name, num_classes=len(SHAPES), **model_kwargs)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1)
                 for v in resolve_input_spec(model).mean_std)
    images, labels = synthetic_shapes(samples, image_size, seed)
    images = (images - mean) / std
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * math.ceil(samples / 64)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(samples).split(64):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` in eval mode on (n, ...) ``images``."""
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()
