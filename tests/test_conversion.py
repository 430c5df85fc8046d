"""Conversion: finding the classifier, which layers are wrapped, and how."""
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

import avalanche_maskrkr as amr
from avalanche_maskrkr.layers import RKRLayer, TaskAdaptedLayer, TaskBatchNorm
from backbones import BACKBONES


def _on_meta(build):
    with torch.device("meta"):
        return build()


@pytest.mark.parametrize("build,head", [
    (BACKBONES["vit"], "head"),
    (BACKBONES["swin"], "head.fc"),
    (BACKBONES["resnet"], "fc"),
    (BACKBONES["mlp"], "classifier"),
    (lambda: torchvision.models.resnet18(num_classes=3), "fc"),
    (lambda: torchvision.models.vit_b_16(num_classes=3), "heads.head"),
    (lambda: torchvision.models.efficientnet_b0(num_classes=3), "classifier.1"),
])
def test_classifier_is_found(build, head):
    assert amr.find_classifier(_on_meta(build)) == head


def test_missing_classifier_asks_for_head_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="head_name"):
        amr.convert(model, "rkr")
    network = amr.convert(model, "rkr", head_name="2")
    assert network.feature_dim == 4 and isinstance(network.backbone[2], nn.Identity)


def _wrapped(network):
    return {n: m for n, m in network.backbone.named_modules() if isinstance(m, TaskAdaptedLayer)}


def test_vit_adapts_every_linear_but_not_patch_embedding_and_splits_qkv():
    model = BACKBONES["vit"]()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "head"]
    network = amr.convert(model, "rkr")
    wrapped = _wrapped(network)
    assert sorted(wrapped) == sorted(linears)
    assert all(m.n_split == (3 if n.endswith("qkv") else 1) for n, m in wrapped.items())
    assert isinstance(network.backbone.patch_embed.proj, nn.Conv2d)
    assert not isinstance(network.backbone.patch_embed.proj, TaskAdaptedLayer)
    unsplit = _wrapped(amr.convert(BACKBONES["vit"](), "rkr", split_qkv=False))
    assert all(m.n_split == 1 for m in unsplit.values())
    with_patch = _wrapped(amr.convert(BACKBONES["vit"](), "piggyback", adapt_patch_embed=True))
    assert "patch_embed.proj" in with_patch


def test_cnn_adapts_every_convolution_including_stem_grouped_and_depthwise():
    model = timm.create_model("mobilenetv3_small_050", num_classes=3)
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
             and n != "classifier"]
    assert any(m.groups > 1 for m in model.modules() if isinstance(m, nn.Conv2d))
    network = amr.convert(model, "rkr")
    wrapped = _wrapped(network)
    assert sorted(wrapped) == sorted(convs) and "conv_stem" in wrapped
    network.add_task(0, 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = network.eval()(x, 0)
    assert out.shape == (2, 3)


def test_frozen_base_and_per_task_batchnorm():
    model = BACKBONES["resnet"]()
    n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    network = amr.convert(model, "piggyback", bn_policy="per_task")
    assert not any(p.requires_grad for p in network.parameters())
    norms = [m for m in network.backbone.modules() if isinstance(m, TaskBatchNorm)]
    assert len(norms) == n_norms > 0
    network.add_task(0, 2)
    network.train()
    assert all(m.tasks["0"].training and not m.base.training for m in norms)


class _Attention(nn.Module):
    """nn.MultiheadAttention, a Linear and a head (torchvision's ViT encoder in small)."""

    def __init__(self, **attention):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **attention)
        self.mlp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        kv = x if self.attn.kdim == x.shape[-1] else x[..., :self.attn.kdim]
        return self.head(self.mlp(self.attn(x, kv, kv)[0]).mean(1))


@pytest.mark.parametrize("split_qkv", [True, False])
def test_multihead_attention_projections_are_adapted(split_qkv):
    torch.manual_seed(0)
    model = _Attention()
    packed = model.attn.in_proj_weight, model.attn.in_proj_bias
    x = torch.randn(3, 4, 8)
    model.head = nn.Identity()
    expected = model(x)
    model.head = nn.Linear(8, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        network = amr.convert(model, "rkr", split_qkv=split_qkv)
    wrapped = _wrapped(network)
    assert sorted(wrapped) == ["attn.in_proj", "attn.out_proj", "mlp"]
    assert wrapped["attn.in_proj"].n_split == (3 if split_qkv else 1)
    in_proj = wrapped["attn.in_proj"].base  # the same parameters, under a Linear
    assert (in_proj.weight, in_proj.bias) == packed
    assert "backbone.attn.in_proj.base.weight" in network.state_dict()
    network.add_task(0, 2)  # a new task starts from the base network, fast path or not
    for training in (True, False):
        with torch.set_grad_enabled(training):
            out = network.train(training).forward_single_task(x, 0)
        torch.testing.assert_close(out, network.heads["0"](expected))


def test_layers_that_cannot_be_adapted_are_named_with_their_cost():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = _Attention(kdim=6, vdim=6)  # separate q (8 x 8), k and v (8 x 6) weights
    model.mlp = Doubled(8, 8)
    with pytest.warns(UserWarning) as caught:
        network = amr.convert(model, "piggyback")
    message = str(caught[0].message)
    assert ("attn (the separate q, k, v weights of MultiheadAttention) stays shared by all "
            "tasks: 160 parameters not adapted") in message
    assert "mlp (Doubled overrides forward) stays shared by all tasks: 72 parameters" in message
    assert sorted(_wrapped(network)) == ["attn.out_proj"]
    network.add_task(0, 2)
    x = torch.randn(3, 4, 8)
    assert network.eval()(x, torch.zeros(3, dtype=torch.long)).shape == (3, 2)


def test_only_patchify_convolution_of_a_network_is_its_patch_embedding():
    """torchvision's Swin names its patch embedding features.0.0; a network whose only
    convolution has its kernel equal to its stride is taken as a transformer."""
    def swin():
        return torchvision.models.swin_transformer.SwinTransformer(
            patch_size=[4, 4], embed_dim=8, depths=[2], num_heads=[1], window_size=[2, 2],
            num_classes=2)

    assert "features.0.0" not in _wrapped(amr.convert(swin(), "rkr"))
    assert "features.0.0" in _wrapped(amr.convert(swin(), "rkr", adapt_patch_embed=True))
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(), nn.Linear(4, 2))
    assert "0" in _wrapped(amr.convert(cnn, "rkr", head_name="2"))


def test_rank_reaches_the_layers():
    network = amr.convert(BACKBONES["mlp"](), "mask-rkr", rank=5)
    assert all(isinstance(m, RKRLayer) and m.rank == 5 for m in _wrapped(network).values())


@pytest.mark.parametrize("method", ["rkr", "mask-rkr"])
def test_rkr_networks_train_with_in_place_activations_out_of_place(method):
    """A convolution followed directly by ReLU(inplace=True) (VGG style): the RKR layer
    saves its output for dL/dF, so the ReLU must not overwrite it while training; in
    eval mode nothing is saved and it computes in place again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.Dropout(inplace=True),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    network = amr.convert(model, method, head_name="4")
    network.add_task(0, 2)
    # a new module is in train mode
    assert not network.backbone[1].inplace and not network.backbone[2].inplace
    out = network.forward_single_task(torch.randn(4, 3, 6, 6), 0)
    out.sum().backward()
    assert network.backbone[0].tasks["0"].f.grad.abs().sum() > 0
    network.eval()
    assert network.backbone[1].inplace and network.backbone[2].inplace
    piggyback = amr.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True),
                                          nn.Flatten(), nn.Linear(128, 2)), "piggyback",
                            head_name="3")
    assert piggyback.train().backbone[1].inplace  # Piggyback saves inputs only
