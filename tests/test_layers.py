"""The equations of SPEC section 3 against hand computations, per layer kind and path."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from avalanche_maskrkr.layers import (BinaryMask, PiggybackLayer, RKRLayer, TaskContext,
                                      pack_bits, unpack_bits)


def _set(param, values):
    with torch.no_grad():
        param.copy_(values)


def _random_task(layer, task=0, seed=0):
    """Give ``task`` non-trivial real factors (RM is zero at initialisation)."""
    g = torch.Generator().manual_seed(seed)
    own = layer.tasks[str(task)]
    for name in ("lm", "rm", "f"):
        p = getattr(own, name)
        if isinstance(p, nn.Parameter):
            _set(p, torch.randn(p.shape, generator=g))


def _all_paths(layer, x, task=0):
    """Outputs of every training path the layer has (RKR: fold and activations where
    fused), the simple (materialised) path and the folded evaluation weight."""
    layer.context.task = task
    outs = [layer.base_op(x, *layer.effective(task))]
    paths = ["auto"]
    if isinstance(layer, RKRLayer) and layer.training_path(x, task) != "autograd":
        paths = ["fold", "activations"]
    for path in paths:
        layer.path = path
        outs.append(layer.forward_train(x, task))
    layer.path = "auto"
    with torch.no_grad():
        outs.append(layer(x))
    return outs


def _rkr(base, **kw):
    layer = RKRLayer(base.requires_grad_(False), TaskContext(), **kw)  # frozen, as converted
    layer.add_task(0)
    _random_task(layer)
    return layer


def test_rkr_linear_matches_hand_computation():
    torch.manual_seed(0)
    base = nn.Linear(5, 4)
    layer = _rkr(base, rank=2)
    own = layer.tasks["0"]
    lm, rm, f = own.lm[0], own.rm[0], own.f  # (in, K), (K, out), (out,)
    x = torch.randn(5, 5)
    # y = F * ((W + R) x + b) with R^T = LM RM (paper layout: in x K times K x out)
    expected = f * (x @ (base.weight.T + lm @ rm) + base.bias)
    for out in _all_paths(layer, x):
        torch.testing.assert_close(out, expected)
    # the auto path folds when P * (3 * out + in) >= 4 * out * in (here 4 * 4 * 5 = 80)
    assert layer.training_path(x, 0) == "fold"  # 5 * 17 = 85
    assert layer.training_path(x[:4], 0) == "activations"  # 4 * 17 = 68


def _hand_conv_rectification(lm, rm, out_ch, in_ch, kh, kw):
    """R[o, i, a, b] = sum_r LM[(a, i), r] RM[r, (b, o)], written as loops."""
    r = torch.zeros(out_ch, in_ch, kh, kw)
    for o in range(out_ch):
        for i in range(in_ch):
            for a in range(kh):
                for b in range(kw):
                    r[o, i, a, b] = sum(lm[a * in_ch + i, k] * rm[k, b * out_ch + o]
                                        for k in range(lm.shape[1]))
    return r


@pytest.mark.parametrize("conv_kw", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1)),
    dict(kernel_size=1),
    dict(kernel_size=3, padding=1, groups=2),  # grouped: materialised path
    dict(kernel_size=3, padding=1, groups=4),  # depthwise (in = out = groups)
])
def test_rkr_conv_matches_hand_computation(conv_kw):
    torch.manual_seed(0)
    base = nn.Conv2d(4, 4, **conv_kw)
    layer = _rkr(base, rank=2)
    own = layer.tasks["0"]
    out_ch, in_ch, kh, kw = base.weight.shape
    assert own.lm.shape == (1, kh * in_ch, 2) and own.rm.shape == (1, 2, kw * out_ch)
    r = _hand_conv_rectification(own.lm[0], own.rm[0], out_ch, in_ch, kh, kw)
    x = torch.randn(2, 4, 9, 8)
    expected = own.f.view(-1, 1, 1) * base._conv_forward(x, base.weight + r, base.bias)
    for out in _all_paths(layer, x):
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert layer.training_path(x, 0) == ("fold" if base.groups == 1 else "autograd")


def test_split_qkv_has_one_factor_pair_per_third():
    torch.manual_seed(0)
    base = nn.Linear(4, 12)
    layer = _rkr(base, rank=2, n_split=3)
    own = layer.tasks["0"]
    assert own.lm.shape == (3, 4, 2) and own.rm.shape == (3, 2, 4)
    r = torch.cat([(own.lm[s] @ own.rm[s]).T for s in range(3)])  # q, k, v rows
    x = torch.randn(2, 7, 4)
    expected = own.f * (x @ (base.weight + r).T + base.bias)
    for out in _all_paths(layer, x):
        torch.testing.assert_close(out, expected)
    assert layer.task_cost(0).real == 2 * (3 * 4 + 12) + 12


@pytest.mark.parametrize("base,expected", [
    (nn.Linear(10, 6), 2 * (10 + 6) + 6),  # K (in + out) + out
    (nn.Conv2d(8, 16, 3), 2 * 3 * (8 + 16) + 16),  # K k (in + out) + out
])
def test_rkr_parameter_count(base, expected):
    layer = _rkr(base, rank=2)
    assert layer.task_cost(0).real == expected
    assert layer.task_cost(0).nbytes == expected * 4


def test_new_rkr_task_starts_from_the_base_network():
    torch.manual_seed(0)
    base = nn.Conv2d(3, 5, 3, padding=1)
    layer = RKRLayer(base, TaskContext())
    layer.add_task(0)
    x = torch.randn(2, 3, 6, 6)
    layer.context.task = 0
    torch.testing.assert_close(layer.forward_train(x, 0), base(x))


def test_fast_path_gradients_equal_simple_path():
    torch.manual_seed(0)
    for base, x in ((nn.Linear(6, 5), torch.randn(4, 6)),
                    (nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.randn(2, 3, 7, 7))):
        layer = _rkr(base.requires_grad_(False), rank=3)
        grads = {}
        for path in ("fold", "activations", "simple"):
            layer.zero_grad()
            layer.path = path if path != "simple" else "auto"
            out = (layer.forward_train(x, 0) if path != "simple"
                   else layer.base_op(x, *layer.effective(0)))
            (out ** 2).sum().backward()
            grads[path] = [p.grad.clone() for p in layer.task_parameters(0)]
        for path in ("fold", "activations"):
            for fast, simple in zip(grads[path], grads["simple"]):
                torch.testing.assert_close(fast, simple, rtol=1e-4, atol=1e-5)
        assert base.weight.grad is None  # the frozen base never gets a gradient


def test_piggyback_equation_and_straight_through_gradient():
    torch.manual_seed(0)
    base = nn.Linear(6, 3).requires_grad_(False)  # frozen, as the network makes it
    layer = PiggybackLayer(base, TaskContext(), mask_init=1e-2, mask_threshold=5e-3)
    layer.add_task(0)
    scores = layer.tasks["0"].mask.scores
    _set(scores, torch.randn(3, 6) * 1e-2)
    mask = (scores > 5e-3).float()
    x = torch.randn(4, 6)
    expected = x @ (base.weight * mask).T + base.bias
    for out in _all_paths(layer, x):
        torch.testing.assert_close(out, expected)
    # straight-through: dL/dS = dL/dW_eff * W
    w_eff = (base.weight * mask).detach().requires_grad_(True)
    (F.linear(x, w_eff, base.bias) ** 2).sum().backward()
    layer.context.task = 0
    (layer(x) ** 2).sum().backward()
    torch.testing.assert_close(scores.grad, w_eff.grad * base.weight)


def test_mask_rkr_masks_the_first_tasks_factors():
    torch.manual_seed(0)
    base = nn.Linear(5, 4)
    layer = RKRLayer(base, TaskContext(), rank=2, mask_rg=True, mask_sfg=True)
    layer.add_task(0)
    _random_task(layer)
    layer.add_task(1)
    first, second = layer.tasks["0"], layer.tasks["1"]
    assert all(isinstance(getattr(second, n), BinaryMask) for n in ("lm", "rm", "f"))
    assert isinstance(first.lm, nn.Parameter)
    for name in ("lm", "rm", "f"):
        scores = getattr(second, name).scores
        _set(scores, torch.where(torch.rand(scores.shape) < 0.4, 0.0, 1e-2))
    ml, mr, mf = (getattr(second, n).mask().float() for n in ("lm", "rm", "f"))
    lm, rm = first.lm[0] * ml[0], first.rm[0] * mr[0]
    x = torch.randn(3, 5)
    expected = (first.f * mf) * (x @ (base.weight.T + lm @ rm) + base.bias)
    for out in _all_paths(layer, x, task=1):
        torch.testing.assert_close(out, expected)
    # stored cost of a later task: 1 bit per LM, RM, F entry
    n = 2 * (5 + 4) + 4
    assert layer.task_cost(1) == (0, n, sum(math.ceil(m / 8) for m in (10, 8, 4)))


def test_mask_rkr_product_placement_and_unmasked_generators():
    torch.manual_seed(0)
    base = nn.Conv2d(3, 4, 3, padding=1)
    layer = RKRLayer(base, TaskContext(), rank=2, mask_rg=True, mask_sfg=False,
                     placement="product")
    layer.add_task(0)
    _random_task(layer)
    layer.add_task(1)
    second = layer.tasks["1"]
    assert isinstance(second.f, nn.Parameter) and second.r.shape == tuple(base.weight.shape)
    _set(second.r.scores, torch.where(torch.rand(base.weight.shape) < 0.5, 0.0, 1e-2))
    _set(second.f, torch.rand(4))
    first = layer.tasks["0"]
    r = _hand_conv_rectification(first.lm[0], first.rm[0], 4, 3, 3, 3) * second.r.mask()
    x = torch.randn(2, 3, 5, 5)
    expected = second.f.view(-1, 1, 1) * base._conv_forward(x, base.weight + r, base.bias)
    for out in _all_paths(layer, x, task=1):
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert layer.task_cost(1) == (4, base.weight.numel(), 16 + math.ceil(108 / 8))
    # placement "none" masks nothing, whatever mask_rg and mask_sfg say: RKR
    plain = RKRLayer(nn.Linear(3, 4), TaskContext(), mask_rg=True, mask_sfg=True,
                     placement="none")
    plain.add_task(0), plain.add_task(1)
    assert all(isinstance(getattr(plain.tasks["1"], n), nn.Parameter) for n in ("lm", "rm", "f"))
    assert plain.task_cost(1) == (2 * (3 + 4) + 4, 0, (2 * (3 + 4) + 4) * 4)


def test_bit_packing_round_trips_and_freezing_keeps_outputs():
    g = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (8,), (3, 5, 2), (64, 33)]:
        mask = torch.rand(shape, generator=g) > 0.5
        bits = pack_bits(mask)
        assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(mask.numel() / 8)
        assert torch.equal(unpack_bits(bits, shape), mask)
    base = nn.Conv2d(3, 4, 3)
    layer = PiggybackLayer(base, TaskContext())
    layer.add_task(0)
    _set(layer.tasks["0"].mask.scores, torch.randn(base.weight.shape, generator=g) * 1e-2)
    x = torch.randn(1, 3, 5, 5)
    layer.context.task = 0
    with torch.no_grad():
        before = layer(x)
    layer.finish_task(0)
    state = layer.state_dict()
    assert "tasks.0.mask.bits" in state and "tasks.0.mask.scores" not in state
    assert state["tasks.0.mask.bits"].numel() == math.ceil(base.weight.numel() / 8)
    assert layer.task_parameters(0) == []
    with torch.no_grad():
        assert torch.equal(layer(x), before)


def test_fold_cache_follows_in_place_updates():
    torch.manual_seed(0)
    layer = _rkr(nn.Linear(4, 4), rank=2)
    x = torch.randn(2, 4)
    layer.context.task = 0
    with torch.no_grad():
        before = layer(x)
        assert layer(x) is not before and torch.equal(layer(x), before)
        layer.tasks["0"].f.mul_(2)  # an optimizer step is in place too
        torch.testing.assert_close(layer(x), before * 2)


def test_untrained_task_and_no_task_use_the_base_layer():
    base = nn.Linear(3, 2)
    layer = _rkr(base)
    x = torch.randn(2, 3)
    for task in (None, 5):
        layer.context.task = task
        assert torch.equal(layer(x), base(x))
