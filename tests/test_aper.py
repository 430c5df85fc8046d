"""APER: the module trains on the first experience only, features are [base, adapted],
prototypes are their class means, with every adapter kind."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from sklearn.datasets import load_digits
from torch import nn

from avalanche_maskrkr.cil import APER, APERClassifier, APERPlugin, RanPAC
from avalanche_maskrkr.cil.aper import BottleneckBackbone
from avalanche_maskrkr.cil.prototypes import remove_classifier
from avalanche_maskrkr.options import make_options
from backbones import swin
from test_cil import evaluator, tensors

ACCURACY = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
CLASS_ORDER = [7, 3, 5, 0, 1, 2, 4, 6, 8, 9]  # the first experience holds ids 3 and 7


def digits_stream(n_per_class: int = 40):
    """Split digits (1x8x8), two classes per experience in CLASS_ORDER, global ids."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    keep = torch.cat([(labels == c).nonzero().flatten()[:n_per_class] for c in range(10)])
    images, labels = images[keep], labels[keep]
    test = torch.arange(len(labels)) % 4 == 0
    train_set, test_set = (_make_taskaware_tensor_classification_dataset(images[m], labels[m])
                           for m in (~test, test))
    return nc_benchmark(train_set, test_set, 5, task_labels=False, shuffle=False,
                        fixed_class_order=CLASS_ORDER)


def vit():
    return timm.create_model("test_vit", img_size=8, patch_size=2, in_chans=1, depth=2,
                             num_classes=2)


def resnet():
    """timm's test_resnet with BatchNorm statistics of digit-like inputs (as pretrained)."""
    model = timm.create_model("test_resnet", in_chans=1, num_classes=2)
    with torch.no_grad():
        model.train()(torch.rand(64, 1, 8, 8))
    return model.eval()


def torchvision_vit():
    return torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=2,
                                                num_heads=2, hidden_dim=16, mlp_dim=32,
                                                num_classes=2)


def without_head(model: nn.Module) -> nn.Module:
    """A copy of ``model`` returning its features (B, D)."""
    model = copy.deepcopy(model)
    remove_classifier(model)
    return model.eval()


class Recorder(SupervisedPlugin):
    """Records, per training epoch, the optimizer's parameters and groups' roles and the
    parameters that require a gradient; and the training outputs."""

    def __init__(self):
        super().__init__()
        self.optimized, self.roles, self.trainable, self.outputs = [], [], [], []

    def before_training_epoch(self, strategy, **kwargs):
        groups = strategy.optimizer.param_groups
        self.optimized.append([p for g in groups for p in g["params"]])
        self.roles.append([g["role"] for g in groups])
        self.trainable.append({id(p) for p in strategy.model.parameters() if p.requires_grad})

    def after_forward(self, strategy, **kwargs):
        self.outputs.append(strategy.mb_output.detach())


def aper(model, adapter, recorder=None, **options):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return APER(model=model, optimizer=optimizer, adapter=adapter, adapter_options=options,
                train_epochs=2, train_mb_size=16, eval_mb_size=128, evaluator=evaluator(),
                plugins=[recorder] if recorder else None)


def snapshot(module: nn.Module) -> dict:
    return copy.deepcopy(module.state_dict())


def assert_same(before: dict, module: nn.Module) -> None:
    """``module``'s state is bit-identical to ``before`` (tensors and extra states)."""
    after = module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) if isinstance(after[k], torch.Tensor)
               else before[k] == after[k] for k in before)


def class_means(features, labels, classes):
    return torch.stack([features[labels == c].mean(0) for c in classes])


@pytest.mark.parametrize("make, shape, n_blocks, dim", [
    (vit, (1, 8, 8), 2, 64), (swin, (3, 16, 16), 4, 32), (torchvision_vit, (3, 8, 8), 2, 16)])
@torch.no_grad()
def test_bottleneck_goes_beside_every_block_mlp_and_starts_as_identity(make, shape, n_blocks,
                                                                       dim):
    torch.manual_seed(0)
    model = make()
    reference = without_head(model)
    backbone = BottleneckBackbone(model)
    assert len(backbone.adapters) == n_blocks
    x = torch.rand(4, *shape)
    features = backbone(x)
    assert features.shape == (4, 2 * dim)
    base, adapted = features.chunk(2, dim=1)
    assert torch.equal(base, reference(x))
    assert torch.equal(adapted, base)  # zero up-projection: the adapter adds 0
    nn.init.normal_(backbone.adapters[-1].branch.up.weight)
    base_after, adapted_after = backbone(x).chunk(2, dim=1)
    assert torch.equal(base_after, base) and not torch.allclose(adapted_after, base)


def test_bottleneck_trains_once_features_by_hand_prototypes_are_class_means():
    torch.manual_seed(0)
    stream = digits_stream()
    model = vit()
    reference = without_head(model)
    recorder = Recorder()
    strategy = aper(model, "bottleneck", recorder)
    backbone = strategy.model.backbone
    strategy.train(stream.train_stream[0])
    # the first experience: two SGD epochs on the branches and a 2-class head
    assert len(recorder.optimized) == 2
    assert {id(p) for p in recorder.optimized[0]} == recorder.trainable[0]
    assert recorder.roles[0] == ["head", "factors"]
    head = recorder.optimized[0][:2]
    assert [p.shape for p in head] == [(2, 64), (2,)]
    branches = [p for a in backbone.adapters for p in a.branch.parameters()]
    assert recorder.optimized[0][2:] == branches
    # logits over global ids: the head's at columns 3 and 7 (its classes), -inf elsewhere
    finite = torch.isfinite(recorder.outputs[0])
    assert finite.shape[1] == 8 and finite[:, [3, 7]].all() and finite.sum() == 2 * len(finite)
    assert backbone.head is None and backbone.frozen and not backbone.training
    assert not any(p.requires_grad for p in strategy.model.parameters())
    assert all(a.branch.up.weight.abs().sum() > 0 for a in backbone.adapters)
    frozen = snapshot(backbone)
    strategy.train(stream.train_stream[1:3])
    assert len(recorder.optimized) == 2  # later experiences: no epoch, one statistics pass
    assert_same(frozen, backbone)

    def branch_by_hand(adapter):
        def hook(module, args, output):
            down, up = adapter.branch.down, adapter.branch.up
            hidden = torch.relu(args[0] @ down.weight.T + down.bias)
            return output + 0.1 * (hidden @ up.weight.T + up.bias)
        return hook

    adapted_reference = copy.deepcopy(reference)
    for block, adapter in zip(adapted_reference.blocks, backbone.adapters):
        block.mlp.register_forward_hook(branch_by_hand(adapter))
    x, y = tensors(stream.train_stream[:3])
    with torch.no_grad():
        hand = torch.cat([reference(x), adapted_reference(x)], dim=1)
    features = backbone(x)
    assert torch.equal(features[:, :64], hand[:, :64])
    torch.testing.assert_close(features, hand)
    classes = CLASS_ORDER[:6]
    means = class_means(hand, y, classes)
    torch.testing.assert_close(strategy.model.means[classes], means)
    assert strategy.model.seen.nonzero().flatten().tolist() == sorted(classes)
    logits = strategy.model(x)
    cosine = F.normalize(hand, dim=1) @ F.normalize(means, dim=1).T
    torch.testing.assert_close(logits[:, classes], cosine)
    assert torch.isinf(logits[:, [6]]).all()


@pytest.mark.parametrize("adapter", ["rkr", "piggyback", "mask-rkr"])
def test_method_adapter_on_a_cnn_trains_once_features_concatenate(adapter):
    torch.manual_seed(0)
    stream = digits_stream()
    model = resnet()
    reference = without_head(model)
    recorder = Recorder()
    strategy = aper(model, adapter, recorder, mask_lr=0.1)
    network = strategy.model.backbone.network
    strategy.train(stream.train_stream[0])
    # Mask-RKR's first task learns real factors, as RKR; masks come with later tasks only
    assert recorder.roles[0] == ["head", "masks" if adapter == "piggyback" else "factors"]
    assert {id(p) for p in recorder.optimized[0]} == recorder.trainable[0]
    assert network.heads["0"].out_features == 2
    assert network.trained_tasks == [0] and list(network.heads) == ["0"]
    assert not any(p.requires_grad for p in strategy.model.parameters())
    frozen = snapshot(network)
    strategy.train(stream.train_stream[1:3])
    assert_same(frozen, network)
    assert len(recorder.optimized) == 2 and list(network.heads) == ["0"]  # no later epoch

    x, y = tensors(stream.train_stream[:3])
    features = strategy.model.backbone(x)
    base, adapted = features.chunk(2, dim=1)
    with torch.no_grad():
        assert torch.equal(base, network.base_features(x))
        torch.testing.assert_close(base, reference(x))
        torch.testing.assert_close(network.heads["0"](adapted), network.forward_single_task(x, 0))
    classes = CLASS_ORDER[:6]
    torch.testing.assert_close(strategy.model.means[classes],
                               class_means(features, y, classes))
    x_test, y_test = tensors(stream.test_stream[:3])
    accuracy = strategy.eval(stream.test_stream[:3])[ACCURACY]
    by_hand = (strategy.model(x_test).argmax(1) == y_test).double().mean().item()
    assert accuracy == pytest.approx(by_hand, abs=1e-12)


def test_on_a_vit_rkr_moves_the_features_and_mask_rkr_adapting_once_is_rkr():
    """Mask-RKR learns real factors on its first task and masks on later ones only: APER,
    which adapts once, trains exactly what RKR trains."""
    stream = digits_stream()
    x = tensors(stream.train_stream[:1])[0]
    features = {}
    for adapter in ("rkr", "mask-rkr"):
        torch.manual_seed(0)
        strategy = aper(vit(), adapter)
        strategy.train(stream.train_stream[0])
        features[adapter] = strategy.model.backbone(x)
    base, adapted = features["rkr"].chunk(2, dim=1)
    assert not torch.allclose(base, adapted)
    assert torch.equal(features["rkr"], features["mask-rkr"])


def test_head_name_joins_a_methods_full_options():
    """All of a method's options (``dataclasses.asdict``, ``head_name`` included) and the
    strategy's own ``head_name``: the latter is used."""
    options = dataclasses.asdict(make_options("rkr", rank=1))
    classifier = APERClassifier(resnet(), "rkr", options, head_name="fc")
    assert classifier.backbone.network.options == make_options("rkr", rank=1, head_name="fc")


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="unknown adapter 'lora'"):
        APERClassifier(vit(), "lora")
    with pytest.raises(ValueError, match="'rkr', 'piggyback' or 'mask-rkr'"):
        APERClassifier(resnet(), "bottleneck")
    with pytest.raises(ValueError, match="train_base_first"):
        APERClassifier(resnet(), "rkr", {"train_base_first": True})
    with pytest.raises(TypeError, match="rank"):
        APERClassifier(vit(), "bottleneck", {"rank": 2})
    with pytest.raises(ValueError, match="train_epochs"):
        APER(model=vit(), optimizer=torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1),
             train_epochs=0)


def test_plugin_on_naive_is_the_strategy():
    """APERPlugin on Naive trains the module on the first experience for Naive's epochs,
    then only sets prototypes: the same classifier as the APER strategy's."""
    stream = digits_stream()
    torch.manual_seed(0)
    model = vit()
    runs = []
    for build in (lambda m: aper(m, "bottleneck"),  # the module is made here...
                  lambda m: Naive(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1,
                                                                     momentum=0.9),
                                  train_mb_size=16, train_epochs=2, eval_mb_size=128,
                                  evaluator=evaluator(), plugins=[APERPlugin("bottleneck")])):
        torch.manual_seed(1)  # ...or when Naive first trains: the same random numbers
        runs.append(build(copy.deepcopy(model)))
        for experience in stream.train_stream[:2]:
            runs[-1].train(experience)
    strategy, naive = runs
    x, _ = tensors(stream.test_stream[:2])
    naive.model.eval()
    strategy.model.eval()
    # the same up to the order of float operations (cosine logits, in [-1, 1])
    torch.testing.assert_close(naive.model(x), strategy.model(x), rtol=0, atol=2e-4)
    assert naive.train_epochs == 2 and naive.model.backbone.frozen


def test_ranpac_with_first_session_adaptation():
    """RanPAC's optional adaptation: the module trains on the first experience only;
    the ridge classifier then reads the adapted features alone (D, not 2D), and it is the
    joint ridge solution on them."""
    torch.manual_seed(0)
    stream = digits_stream()
    model = vit()
    with pytest.raises(ValueError, match="needs an optimizer"):
        RanPAC(model=copy.deepcopy(model), M=32, adapter="bottleneck")
    strategy = RanPAC(model=model, M=32, adapter="bottleneck", ridge_grid=(1.0,),
                      optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                      train_epochs=2, train_mb_size=16, eval_mb_size=128, evaluator=evaluator())
    backbone = strategy.model.backbone
    strategy.train(stream.train_stream[0])
    assert backbone.frozen and backbone.feature_dim == 64
    assert all(a.branch.up.weight.abs().sum() > 0 for a in backbone.adapters)
    frozen = snapshot(backbone)
    strategy.train(stream.train_stream[1])
    assert_same(frozen, backbone)
    x, y = tensors(stream.train_stream[:2])
    with torch.no_grad():
        adapted = backbone.adapted_features(x)
        h = strategy.model.project(adapted).double()
    targets = F.one_hot(y, int(y.max()) + 1).double()
    joint = torch.linalg.solve(h.T @ h + torch.eye(32, dtype=torch.float64), h.T @ targets)
    torch.testing.assert_close(strategy.model.weight, joint.float(), rtol=1e-4, atol=1e-5)
