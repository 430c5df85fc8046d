"""Every fast path against the simple one, on small timm models with random weights.

The simple path of a layer computes its effective weight with differentiable tensor ops
and runs the base op with it: RKR materialises R = LM RM; Piggyback writes the
straight-through estimator as W * M + (S - S.detach()) * W. The fast paths (RKR's
rank-K path on activations, the masks' autograd function, the folded and cached
evaluation weights) must give the same outputs and the same gradients for every trained
parameter, and the fold cache must follow optimizer steps.
"""
import copy

import pytest
import torch
from torch import nn

from avalanche_maskrkr import convert
from avalanche_maskrkr.accounting import create_backbone
from avalanche_maskrkr.layers import PiggybackLayer, RKRLayer, TaskAdaptedLayer

MODELS = {
    "vit": (lambda: create_backbone("vit_tiny_patch16_224", 3, img_size=32, depth=2), 32),
    "swin": (lambda: create_backbone("swin_tiny_patch4_window7_224", 3, img_size=32,
                                     window_size=4, embed_dim=24, depths=(1, 1),
                                     num_heads=(1, 2), drop_path_rate=0.0), 32),
    "resnet": (lambda: create_backbone("test_resnet", 3), 16),
}
METHODS = ["rkr", "piggyback", "mask-rkr"]


def _simple_forward(layer: TaskAdaptedLayer, x: torch.Tensor, task: int) -> torch.Tensor:
    """The layer's training output from its effective weight, by plain autograd."""
    if isinstance(layer, PiggybackLayer):
        mask = layer.tasks[str(task)].mask
        weight = layer.base.weight
        effective = weight * mask.mask() + (mask.scores - mask.scores.detach()) * weight
        return layer.base_op(x, effective, layer.base.bias)
    return TaskAdaptedLayer.forward_train(layer, x, task)


def _network(model_name: str, method: str):
    """A converted model whose trained task has non-trivial parameters (for Mask-RKR:
    the masks of task 1 over the real factors of a finished task 0)."""
    build, size = MODELS[model_name]
    torch.manual_seed(0)
    net = convert(build(), method)
    g = torch.Generator().manual_seed(1)
    for task in ([0, 1] if method == "mask-rkr" else [0]):
        net.add_task(task, 3)
        with torch.no_grad():
            for p in net.trainable_parameters([task]):
                if p.dim() == 1 or task == 1 or method == "piggyback":  # scores, F, masks
                    p.copy_(torch.where(torch.rand(p.shape, generator=g) < 0.3, 0.0, p))
                p.add_(torch.randn(p.shape, generator=g) * 1e-2)
        if task == 0 and method == "mask-rkr":
            net.finish_task(0)
    x = torch.randn(4, 3, size, size, generator=g)
    return net.train(), task, x


def _loss_and_grads(net, task, x, simple: bool):
    layers = [m for m in net.modules() if isinstance(m, TaskAdaptedLayer)]
    for layer in layers:
        if simple:
            layer.forward_train = lambda x, t, layer=layer: _simple_forward(layer, x, t)
    try:
        params = net.trainable_parameters([task])
        for p in params:
            p.grad = None
        out = net.forward_single_task(x, task)
        (out.square().sum() + out.sum()).backward()
        return out.detach(), [p.grad.clone() for p in params]
    finally:
        for layer in layers:
            layer.__dict__.pop("forward_train", None)


def _count_folds(net):
    counts = {"n": 0}
    for layer in net.modules():
        if isinstance(layer, TaskAdaptedLayer):
            def counted(task, layer=layer, original=layer.effective):
                counts["n"] += 1
                return original(task)
            layer.effective = counted
    return counts


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_fast_training_path_matches_simple_path(model_name, method):
    net, task, x = _network(model_name, method)
    fast_out, fast_grads = _loss_and_grads(net, task, x, simple=False)
    simple_out, simple_grads = _loss_and_grads(net, task, x, simple=True)
    torch.testing.assert_close(fast_out, simple_out, rtol=1e-4, atol=1e-5)
    assert len(fast_grads) == len(simple_grads) > 0
    for fast, simple in zip(fast_grads, simple_grads):
        torch.testing.assert_close(fast, simple, rtol=1e-3, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in fast_grads)
    if method != "piggyback":  # RKR layers really take the activation path somewhere
        assert any(m.on_activations for m in net.modules() if isinstance(m, RKRLayer))
    assert all(p.grad is None for p in net.base_parameters())  # no base-weight gradient


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_folded_eval_is_cached_equal_and_follows_optimizer_steps(model_name, method):
    net, task, x = _network(model_name, method)
    unfolded, _ = _loss_and_grads(net, task, x, simple=True)
    folds = _count_folds(net)
    n_layers = sum(isinstance(m, TaskAdaptedLayer) for m in net.modules())
    net.eval()
    with torch.no_grad():
        first = net.forward_single_task(x, task)
        again = net.forward_single_task(x, task)
    assert folds["n"] == n_layers  # folded once per layer, then the cache is reused
    torch.testing.assert_close(first, unfolded, rtol=1e-5, atol=1e-6)
    assert torch.equal(first, again)
    net.train()
    _loss_and_grads(net, task, x, simple=False)
    torch.optim.SGD(net.trainable_parameters([task]), lr=1.0).step()
    expected, _ = _loss_and_grads(net, task, x, simple=True)
    net.eval()
    folds["n"] = 0
    with torch.no_grad():
        stepped = net.forward_single_task(x, task)
    assert folds["n"] == n_layers  # every layer refolded after the step
    assert not torch.allclose(stepped, first)
    torch.testing.assert_close(stepped, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_bf16_autocast_training_on_cpu(model_name):
    net, task, x = _network(model_name, "mask-rkr")
    reference_out, reference = _loss_and_grads(net, task, x, simple=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _loss_and_grads(net, task, x, simple=False)
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference_out).norm() < 0.05 * reference_out.norm()
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # bf16 rounding changes the smallest gradients; the descent direction stays
    low, full = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in reference])
    assert nn.functional.cosine_similarity(low, full, dim=0) > 0.99


@pytest.mark.parametrize("method", ["rkr", "piggyback"])
def test_base_gradients_while_the_base_trains_with_the_first_task(method):
    """``train_base_first``: the first task trains the base too, so its layers' training
    path must return the gradients of W and b, as the simple path does."""
    build, size = MODELS["resnet"]
    torch.manual_seed(0)
    net = convert(build(), method, train_base_first=True)
    net.add_task(0, 3)
    x = torch.randn(2, 3, size, size)
    grads = []
    for simple in (False, True):
        base = net.base_parameters()
        for p in base:
            p.grad = None
        _loss_and_grads(net.train(), 0, x, simple)
        grads.append([p.grad for p in base])
    assert all(g is not None for g in grads[0])
    for fast, simple in zip(*grads):
        torch.testing.assert_close(fast, simple, rtol=1e-3, atol=1e-5)
