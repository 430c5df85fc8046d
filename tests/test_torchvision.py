"""torchvision backbones: every projection adapted, trained per task, never forgotten.

Tiny configurations of each torchvision classification family, built from its classes
(random weights, 32 x 32 inputs). Their attention reads projection weights directly
(Swin's ``qkv.weight``, ``nn.MultiheadAttention``'s ``in_proj_weight`` and
``out_proj.weight``), so the wrapped layers' ``weight`` and ``bias`` must be the task's.
"""
import copy
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.models import convnext, efficientnet, regnet, resnet, swin_transformer

import avalanche_maskrkr as amr
from avalanche_maskrkr.accounting import method_cost, populated_network
from avalanche_maskrkr.export import export_task, load_task
from avalanche_maskrkr.layers import RKRLayer, TaskAdaptedLayer
from test_fast_paths import _count_folds

METHODS = ["rkr", "piggyback", "mask-rkr"]
CLASSES = 5


def tv_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1,
                                                num_heads=2, hidden_dim=16, mlp_dim=32,
                                                num_classes=CLASSES)


def tv_swin():  # two blocks per stage: the second one shifts its windows
    return swin_transformer.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2],
                                            num_heads=[1, 2], window_size=[2, 2],
                                            stochastic_depth_prob=0.0, num_classes=CLASSES)


def tv_resnet():
    return resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=CLASSES)


def tv_convnext(stages=((8, 16), (16, None))):
    return convnext.ConvNeXt([convnext.CNBlockConfig(c, nxt, 1) for c, nxt in stages],
                             num_classes=CLASSES)


def tv_efficientnet():
    setting = [efficientnet.MBConvConfig(1, 3, 1, 8, 8, 1),
               efficientnet.MBConvConfig(4, 3, 2, 8, 16, 1)]
    return efficientnet.EfficientNet(setting, dropout=0.0, stochastic_depth_prob=0.0,
                                     num_classes=CLASSES, last_channel=32)


def tv_mobilenet():
    return torchvision.models.mobilenet_v3_small(width_mult=0.25, num_classes=CLASSES)


def tv_regnet():
    params = regnet.BlockParams.from_init_params(depth=2, w_0=8, w_a=8.0, w_m=2.0,
                                                 group_width=8, se_ratio=0.25)
    return regnet.RegNet(params, stem_width=8, num_classes=CLASSES)


# family -> (builder, classifier, patch-embedding convolution)
FAMILIES = {
    "vit": (tv_vit, "heads.head", "conv_proj"),
    "swin": (tv_swin, "head", "features.0.0"),
    "resnet": (tv_resnet, "fc", None),
    "convnext": (tv_convnext, "classifier.2", None),
    "efficientnet": (tv_efficientnet, "classifier.1", None),
    "mobilenet": (tv_mobilenet, "classifier.3", None),
    "regnet": (tv_regnet, "fc", None),
}


def _expected_adapted(model, classifier, patch_embed):
    """Every Linear and Conv2d but the classifier and the patch embedding, and the packed
    input projection of every nn.MultiheadAttention."""
    names = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    names |= {f"{n}.in_proj" for n, m in model.named_modules()
              if isinstance(m, nn.MultiheadAttention)}
    return names - {classifier, patch_embed}


def _adapted(network):
    return {n: m for n, m in network.backbone.named_modules() if isinstance(m, TaskAdaptedLayer)}


def _train_step(network, task, x):
    """One Adam step of ``task``'s layer parameters (not its head); returns the layers
    whose parameters got no gradient."""
    network.train()
    layer_params = [p for m in network.task_modules for p in m.task_parameters(task)]
    loss = network.forward_single_task(x, task).logsumexp(1).sum()
    loss.backward()
    untrained = [n for n, m in _adapted(network).items()
                 if not any(p.grad is not None and p.grad.abs().sum() > 0
                            for p in m.task_parameters(task))]
    torch.optim.Adam(layer_params, lr=1e-2).step()
    network.zero_grad(set_to_none=True)
    return untrained


def _eval(network, x, task):
    network.eval()
    with torch.no_grad():
        return network.forward_single_task(x, task)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_adapts_every_projection_trains_and_never_forgets(family, method):
    build, classifier, patch_embed = FAMILIES[family]
    torch.manual_seed(0)
    model = build()
    expected = _expected_adapted(model, classifier, patch_embed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer is left out
        # (the tiny models are random: the never-trained warning is expected)
        warnings.filterwarnings("ignore", message="The base network is frozen from the start")
        network = amr.convert(model, method)
    adapted = _adapted(network)
    assert set(adapted) == expected
    for name, layer in adapted.items():  # fused q, k, v projections split in three
        if isinstance(layer, RKRLayer):
            assert layer.n_split == (3 if name.endswith(("qkv", "in_proj")) else 1)
    x = torch.randn(2, 3, 32, 32)

    network.add_task(0, CLASSES)
    before = _eval(network, x, 0)
    assert _train_step(network, 0, x) == []  # every adapted layer trains
    trained = _eval(network, x, 0)
    assert not torch.allclose(trained, before)
    network.finish_task(0)
    first = _eval(network, x, 0)

    network.add_task(1, CLASSES)
    assert _train_step(network, 1, x) == []
    network.finish_task(1)
    assert torch.equal(_eval(network, x, 0), first)  # task 0 forgets nothing
    assert _eval(network, x, 1).shape == (2, CLASSES)

    folds = _count_folds(network)
    _eval(network, x, 1)
    assert folds["n"] == 0  # evaluation reuses each layer's cached fold


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_attention_folds_each_projection_once_per_training_forward(family):
    """nn.MultiheadAttention reads in_proj_weight three times per forward and Swin reads
    weight and bias separately: each task layer still computes its effective tensors
    once per network forward, and only the layers read this way compute them at all
    (the others take the fused training paths)."""
    torch.manual_seed(0)
    network = amr.convert(FAMILIES[family][0](), "rkr")
    network.add_task(0, CLASSES)
    folds = _count_folds(network)
    network.train().forward_single_task(torch.randn(2, 3, 32, 32), 0).sum().backward()
    projections = {"vit": ("in_proj", "out_proj"), "swin": ("attn.qkv", "attn.proj")}[family]
    assert folds["n"] == sum(n.endswith(projections) for n in _adapted(network)) > 0


@pytest.mark.parametrize("method", METHODS)
def test_code_reading_weight_and_bias_gets_the_current_tasks_tensors(method):
    torch.manual_seed(0)
    network = amr.convert(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)), method,
                          head_name="1")
    layer, context = network.backbone[0], network.context
    network.add_task(0, 2)
    with torch.no_grad():  # a trained task: away from the base weight
        for p in network.trainable_parameters([0]):
            p.copy_(torch.randn(p.shape) * 1e-2)
    x = torch.randn(3, 4)
    assert layer.weight is layer.base.weight and layer.bias is layer.base.bias  # no task
    context.task = 0
    try:
        weight, bias = layer.weight, layer.bias
        assert weight.requires_grad and layer.weight is weight  # read once per forward
        torch.testing.assert_close(nn.functional.linear(x, weight, bias), layer(x))
        read = torch.autograd.grad(nn.functional.linear(x, weight, bias).sum(),
                                   layer.task_parameters(0))
        called = torch.autograd.grad(layer(x).sum(), layer.task_parameters(0))
        for a, b in zip(read, called):
            torch.testing.assert_close(a, b)
        with torch.no_grad():  # the cached fold: no copy per read
            assert layer.weight is layer.weight and not layer.weight.requires_grad
            torch.testing.assert_close(layer.weight, weight)
    finally:
        context.task = None
    assert layer.weight is layer.base.weight


def _timm_vit():
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2,
        num_classes=CLASSES)


def _timm_swin():
    return timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=4, window_size=2, embed_dim=16, depths=(2, 2),
        num_heads=(1, 2), num_classes=CLASSES)


def _timm_resnet():
    return timm.models.resnet.ResNet(timm.models.resnet.BasicBlock, [1, 1, 1, 1],
                                     num_classes=CLASSES)


def _timm_convnext():
    return timm.models.convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                                         num_classes=CLASSES)


def _tv_convnext4():
    return tv_convnext(((8, 16), (16, 24), (24, 32), (32, None)))


def _on_meta(build):
    def built():
        with torch.device("meta"):
            return build()
    return built


@pytest.mark.parametrize("torchvision_build,timm_build,options", [
    (tv_vit, _timm_vit, {}), (tv_vit, _timm_vit, {"split_qkv": False}),
    (tv_swin, _timm_swin, {}), (tv_resnet, _timm_resnet, {}),
    (_tv_convnext4, _timm_convnext, {})])
def test_accounting_equals_the_equivalent_timm_model(torchvision_build, timm_build, options):
    """Totals and bytes per task, for RKR, Piggyback and Mask-RKR over 3 tasks."""
    for method in METHODS:
        costs = [method_cost(populated_network(_on_meta(build), method, 3, CLASSES, **options))
                 for build in (torchvision_build, timm_build)]
        assert costs[0] == costs[1], method


@pytest.mark.parametrize("method", METHODS)
def test_vit_task_round_trips_through_export(method, tmp_path):
    torch.manual_seed(0)
    base = tv_vit()
    network = amr.convert(copy.deepcopy(base), method)
    x = torch.randn(2, 3, 32, 32)
    for task in range(2):
        network.add_task(task, CLASSES)
        _train_step(network, task, x)
        network.finish_task(task)
        export_task(network, task, tmp_path / f"{task}.safetensors")
    fresh = load_task(load_task(copy.deepcopy(base), tmp_path / "0.safetensors"),
                      tmp_path / "1.safetensors")
    for task in range(2):
        assert torch.equal(_eval(fresh, x, task), _eval(network, x, task))
