"""Per-task export: file size as accounted, bit-exact reload into a fresh base model."""
import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from avalanche_maskrkr import convert
from avalanche_maskrkr.accounting import create_backbone
from avalanche_maskrkr.export import export_task, load_task, read_metadata

HEADER_BYTES = 2048  # safetensors header with our metadata stays below this


def _tiny_vit():
    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch16_224", 5, img_size=32, depth=2)


def _tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def _train_tasks(net, n_tasks=2, x=None):
    """Give each task distinct parameters (and BN statistics), then finish it."""
    g = torch.Generator().manual_seed(1)
    for task in range(n_tasks):
        net.add_task(task, 3 + task)
        net.max_class_label = max(net.max_class_label, 3 + task)
        with torch.no_grad():
            for p in net.trainable_parameters([task]):
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 1e-2)
        if x is not None:  # per-task BatchNorm copies update their running statistics
            net.train()
            net.forward_single_task(x, task)
        net.finish_task(task)
    return net.eval()


def _outputs(net, x, tasks):
    with torch.no_grad():
        return [net.forward_single_task(x, t) for t in tasks]


def _accounted_bytes(net, task):
    head = sum(p.numel() * p.element_size() for p in net.heads[str(task)].parameters())
    return sum(m.task_cost(task).nbytes for m in net.task_modules) + head


@pytest.mark.parametrize("method", ["rkr", "piggyback", "mask-rkr"])
def test_round_trip_is_bit_exact_and_as_small_as_accounted(method, tmp_path):
    base = _tiny_vit()
    net = _train_tasks(convert(copy.deepcopy(base), method))
    x = torch.randn(4, 3, 32, 32)
    paths = [tmp_path / f"task{t}.safetensors" for t in range(2)]
    for task, path in enumerate(paths):
        size = export_task(net, task, path)
        accounted = _accounted_bytes(net, task)
        assert accounted <= size < accounted + HEADER_BYTES
    fresh = copy.deepcopy(base)
    for path in paths:
        fresh = load_task(fresh, path)
    assert fresh.trained_tasks == [0, 1]
    for before, after in zip(_outputs(net, x, [0, 1]), _outputs(fresh.eval(), x, [0, 1])):
        assert torch.equal(before, after)
    with torch.no_grad():  # Avalanche's forward with task labels works after loading
        assert fresh(x, torch.ones(4, dtype=torch.long)).shape == (4, 4)


def test_masks_are_bit_packed_in_the_file(tmp_path):
    net = _train_tasks(convert(_tiny_vit(), "piggyback"), n_tasks=1)
    export_task(net, 0, tmp_path / "t.safetensors")
    blobs = load_file(tmp_path / "t.safetensors")
    adapted = [m.base.weight.numel() for m in net.task_modules]
    assert blobs["bits"].dtype == torch.uint8
    assert blobs["bits"].numel() == sum(math.ceil(n / 8) for n in adapted)
    assert blobs["real.float32"].numel() == sum(p.numel() for p in net.heads["0"].parameters())


def test_mask_rkr_later_task_needs_its_shared_factors(tmp_path):
    base = _tiny_vit()
    net = _train_tasks(convert(copy.deepcopy(base), "mask-rkr"))
    export_task(net, 0, tmp_path / "first.safetensors")
    export_task(net, 1, tmp_path / "later.safetensors")
    meta = read_metadata(tmp_path / "later.safetensors")
    assert meta["shared_task"] == 0 and read_metadata(tmp_path / "first.safetensors")[
        "shared_task"] is None
    with pytest.raises(ValueError, match="load task 0's export first"):
        load_task(copy.deepcopy(base), tmp_path / "later.safetensors")
    # another run's first task has other real factors: refused too
    other = _train_tasks(convert(copy.deepcopy(base), "mask-rkr"), n_tasks=1)
    with torch.no_grad():
        next(m for m in other.task_modules).tasks["0"].f.mul_(2)
    export_task(other, 0, tmp_path / "other.safetensors")
    fresh = load_task(copy.deepcopy(base), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="real factors differ"):
        load_task(fresh, tmp_path / "later.safetensors")


def test_per_task_batchnorm_and_training_dtype(tmp_path):
    base = _tiny_cnn()
    x = torch.randn(6, 3, 8, 8)
    net = _train_tasks(convert(copy.deepcopy(base), "rkr", bn_policy="per_task", head_name="8"),
                       x=x)
    net.to(torch.bfloat16)  # a network trained in bf16 stores bf16 factors
    x = x.to(torch.bfloat16)
    size = export_task(net, 1, tmp_path / "t.safetensors")
    blobs = load_file(tmp_path / "t.safetensors")
    assert set(blobs) == {"real.bfloat16", "int.int64"}  # factors, head, BN; BN counters
    assert _accounted_bytes(net, 1) <= size < _accounted_bytes(net, 1) + HEADER_BYTES
    fresh = load_task(copy.deepcopy(base).to(torch.bfloat16), tmp_path / "t.safetensors")
    norm = fresh.backbone.get_submodule("1").tasks["1"]
    assert torch.equal(norm.running_mean, net.backbone.get_submodule("1").tasks["1"].running_mean)
    assert torch.equal(_outputs(net, x, [1])[0], _outputs(fresh.eval(), x, [1])[0])


def test_exporting_a_task_in_training_binarises_its_masks(tmp_path):
    base = _tiny_vit()
    net = convert(copy.deepcopy(base), "piggyback")
    net.add_task(0, 3)
    with torch.no_grad():
        for p in net.trainable_parameters([0]):
            p.copy_(torch.where(torch.rand(p.shape) < 0.3, 0.0, 1e-2))
    x = torch.randn(2, 3, 32, 32)
    expected = _outputs(net.eval(), x, [0])[0]
    export_task(net, 0, tmp_path / "t.safetensors")
    assert net.trainable_parameters([0])  # exporting does not finish the task
    fresh = load_task(copy.deepcopy(base), tmp_path / "t.safetensors")
    assert torch.equal(_outputs(fresh.eval(), x, [0])[0], expected)


def test_mismatches_are_refused(tmp_path):
    base = _tiny_vit()
    net = _train_tasks(convert(copy.deepcopy(base), "rkr"), n_tasks=1)
    path = tmp_path / "t.safetensors"
    export_task(net, 0, path)
    with pytest.raises(ValueError, match="already has task 0"):
        load_task(net, path)
    with pytest.raises(ValueError, match="converted with"):
        load_task(convert(copy.deepcopy(base), "rkr", rank=3), path)
    other_base = copy.deepcopy(base)
    with torch.no_grad():
        other_base.blocks[0].mlp.fc1.weight.add_(1)
    with pytest.raises(ValueError, match="base weights differ"):
        load_task(other_base, path)
    with pytest.raises(ValueError, match="no task 3"):
        export_task(net, 3, tmp_path / "x.safetensors")
