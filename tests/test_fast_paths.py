"""Every fast path against the simple one, on small timm models with random weights.

The simple path of a layer computes its effective weight with differentiable tensor ops
and runs the base op with it: RKR materialises R = LM RM; Piggyback writes the
straight-through estimator as W * M + (S - S.detach()) * W. The fast paths (RKR's
rank-K path on activations, the masks' autograd function, the folded and cached
evaluation weights) must give the same outputs and the same gradients for every trained
parameter, and the fold cache must follow optimizer steps.
"""

import pytest
import torch
from torch import nn

from avalanche_maskrkr import convert
from avalanche_maskrkr.accounting import create_backbone
from avalanche_maskrkr.heap import HeapPeak, heap_peak_available
from avalanche_maskrkr.layers import PiggybackLayer, RKRLayer, TaskAdaptedLayer, TaskContext
from avalanche_maskrkr.layers.functional import ConvOp, LinearOp, _channel_dot, near_zero

MODELS = {
    "vit": (lambda: create_backbone("vit_tiny_patch16_224", 3, img_size=32, depth=2), 32),
    "swin": (lambda: create_backbone("swin_tiny_patch4_window7_224", 3, img_size=32,
                                     window_size=4, embed_dim=24, depths=(1, 1),
                                     num_heads=(1, 2), drop_path_rate=0.0), 32),
    "resnet": (lambda: create_backbone("test_resnet", 3), 16),
}
METHODS = ["rkr", "piggyback", "mask-rkr"]


def _hand_rectified(layer: RKRLayer, task: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """F * (W + R) and F * b of an RKR layer, R materialised from LM and RM (masks applied)
    by the layout of layers/rkr.py's docstring, independently of the layer's own fold:
    Linear: R^T = LM RM per part of the output (q, k, v rows); Conv2d:
    R[o, i, a, b] = sum_r LM[(a, i), r] RM[r, (b, o)]."""
    lm, rm, f, product_mask = layer.factors(task)
    weight = layer.base.weight
    if layer.is_conv:
        out_ch, in_ch, kh, kw = weight.shape
        r = torch.einsum("air,rbo->oiab", lm[0].reshape(kh, in_ch, -1),
                         rm[0].reshape(-1, kw, out_ch))
    else:
        r = torch.cat([(lm[s] @ rm[s]).T for s in range(layer.n_split)])
    if product_mask is not None:
        r = product_mask(r)
    scale = f.view(-1, *[1] * (weight.dim() - 1))
    return scale * (weight + r), None if layer.base.bias is None else f * layer.base.bias


def _simple_forward(layer: TaskAdaptedLayer, x: torch.Tensor, task: int) -> torch.Tensor:
    """The layer's training output from its effective weight written out by hand, by
    plain autograd."""
    if isinstance(layer, PiggybackLayer):
        mask = layer.tasks[str(task)].mask
        weight = layer.base.weight
        effective = weight * mask.mask() + (mask.scores - mask.scores.detach()) * weight
        return layer.base_op(x, effective, layer.base.bias)
    return layer.base_op(x, *_hand_rectified(layer, task))


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


def _paths_taken(net, task, x) -> set[str]:
    """The training paths the RKR layers of ``net`` take for ``x``."""
    paths = set()
    hooks = [m.register_forward_pre_hook(
        lambda m, args: paths.add(m.training_path(args[0], task)))
        for m in net.modules() if isinstance(m, RKRLayer)]
    net.forward_single_task(x, task)
    for hook in hooks:
        hook.remove()
    return paths


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
    if method != "piggyback":  # the RKR layers really take the fused paths
        assert _paths_taken(net, task, x) >= ({"activations"} if model_name == "vit"
                                              else {"fold"})
    assert all(p.grad is None for p in net.base_parameters())  # no base-weight gradient


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_folded_eval_is_cached_equal_and_follows_optimizer_steps(model_name, method):
    """The references are computed in eval mode too (with a gradient, so unfolded): a
    task that trains normalises with batch statistics (``bn_policy="task_stats"``)."""
    net, task, x = _network(model_name, method)
    unfolded, _ = _loss_and_grads(net.eval(), task, x, simple=True)
    folds = _count_folds(net)
    n_layers = sum(isinstance(m, TaskAdaptedLayer) for m in net.modules())
    with torch.no_grad():
        first = net.forward_single_task(x, task)
        again = net.forward_single_task(x, task)
    assert folds["n"] == n_layers  # folded once per layer, then the cache is reused
    torch.testing.assert_close(first, unfolded, rtol=1e-5, atol=1e-6)
    assert torch.equal(first, again)
    net.train()
    _loss_and_grads(net, task, x, simple=False)
    torch.optim.SGD(net.trainable_parameters([task]), lr=1.0).step()
    expected, _ = _loss_and_grads(net.eval(), task, x, simple=True)
    folds["n"] = 0
    with torch.no_grad():
        stepped = net.forward_single_task(x, task)
    assert folds["n"] == n_layers  # every layer refolded after the step
    assert not torch.allclose(stepped, first)
    torch.testing.assert_close(stepped, expected, rtol=1e-5, atol=1e-6)
    # an in-place change in eval mode (no train() to clear the caches) is seen too
    with torch.no_grad():
        for p in net.trainable_parameters([task]):
            p.mul_(0.5).add_(0.01)
    expected, _ = _loss_and_grads(net, task, x, simple=True)
    folds["n"] = 0
    with torch.no_grad():
        changed = net.forward_single_task(x, task)
    assert folds["n"] == n_layers
    torch.testing.assert_close(changed, expected, rtol=1e-5, atol=1e-6)


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


# -- the fused layer functions against plain autograd, layer by layer ------------------------
LAYERS = {
    "linear": (lambda: nn.Linear(6, 8), (5, 6), {}),
    "qkv": (lambda: nn.Linear(4, 12), (2, 7, 4), {"n_split": 3}),
    "conv": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), (2, 3, 7, 7), {}),
    "conv-dilated": (lambda: nn.Conv2d(4, 3, (3, 2), stride=(1, 2), padding=(2, 1),
                                       dilation=(2, 1), bias=False), (2, 4, 8, 9), {}),
    "conv1x1": (lambda: nn.Conv2d(4, 6, 1), (2, 4, 5, 5), {}),
}


def _rkr_layer(kind: str, masks: bool):
    """An RKR layer whose trained task has random factors and an F with an exact zero and
    a value too small to divide by; with ``masks``, Mask-RKR masks of task 1 (some bits
    off) over those factors."""
    build, shape, kw = LAYERS[kind]
    torch.manual_seed(0)
    layer = RKRLayer(build().requires_grad_(False), TaskContext(), rank=2, mask_rg=masks,
                     mask_sfg=masks, **kw)
    layer.add_task(0)
    own = layer.tasks["0"]
    with torch.no_grad():
        for p in (own.lm, own.rm, own.f):
            p.copy_(torch.randn(p.shape))
        own.f[:2] = torch.tensor([0.0, 1e-30])
    task = 0
    if masks:
        layer.finish_task(0)
        layer.add_task(1)
        task = 1
        with torch.no_grad():
            for p in layer.task_parameters(1):
                p.copy_(torch.randn(p.shape) * 1e-2 + 5e-3)  # threshold 5e-3: half the bits on
            f_scores = layer.tasks["1"].f.scores  # both tiny channels on, every 4th off
            f_scores.copy_(torch.where(torch.arange(len(f_scores)) % 4 == 3, 0.0, 1e-2))
    layer.context.task = task
    return layer, task, torch.randn(shape, requires_grad=True)


def _backward(layer, task, x, out, g):
    params = layer.task_parameters(task)
    grads = torch.autograd.grad(out, [x, *params], g)
    return out.detach(), grads


@pytest.mark.parametrize("path", ["fold", "activations"])
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_rkr_fused_paths_equal_plain_autograd(kind, masks, path):
    layer, task, x = _rkr_layer(kind, masks)
    simple = _simple_forward(layer, x, task)
    g = torch.randn(simple.shape)
    expected_out, expected = _backward(layer, task, x, simple, g)
    layer.path = path
    assert layer.training_path(x, task) == path
    out, grads = _backward(layer, task, x, layer.forward_train(x, task), g)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(expected) >= 3  # x, then LM, RM, F or their mask scores
    for fast, slow in zip(grads, expected):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("path", ["fold", "activations"])
@pytest.mark.parametrize("kind", ["qkv", "conv"])
def test_rkr_fused_paths_save_no_pre_scale_output(kind, path):
    """Backward keeps x, the output y, the factors and the K-channel z: no second
    output-sized tensor (the pre-scale output autograd would keep for dL/dF) and no
    weight-sized one (backward folds F * (W + R) again)."""
    layer, task, x = _rkr_layer(kind, masks=False)
    layer.path = path
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer.forward_train(x, task)
    pointers = [t.data_ptr() for t in saved]
    assert x.data_ptr() in pointers and y.data_ptr() in pointers
    others = [t for t in saved if t.data_ptr() not in (x.data_ptr(), y.data_ptr())]
    assert others and all(t.numel() < y.numel() and t.shape != layer.base.weight.shape
                          for t in others)


@pytest.mark.parametrize("kind", ["linear", "qkv", "conv", "conv-dilated"])
def test_piggyback_fused_path_equals_plain_autograd_and_keeps_no_masked_weight(kind):
    build, shape, _ = LAYERS[kind]
    torch.manual_seed(0)
    layer = PiggybackLayer(build().requires_grad_(False), TaskContext())
    layer.add_task(0)
    mask = layer.tasks["0"].mask
    with torch.no_grad():
        mask.scores.copy_(torch.randn(mask.shape) * 1e-2)
    layer.context.task = 0
    x = torch.randn(shape, requires_grad=True)
    simple = _simple_forward(layer, x, 0)
    g = torch.randn(simple.shape)
    expected_out, expected = _backward(layer, 0, x, simple, g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused = layer.forward_train(x, 0)
    out, grads = _backward(layer, 0, x, fused, g)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    for fast, slow in zip(grads, expected):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    assert sorted(t.numel() for t in saved) == sorted([x.numel(), mask.scores.numel()])


@pytest.mark.skipif(not heap_peak_available(), reason="needs glibc's mallinfo2")
def test_heap_peak_sees_a_temporary_freed_inside_the_block():
    x = torch.randn(64)
    with HeapPeak() as heap:
        (x.repeat(2 ** 14) * 2).sum()  # two 4 MiB temporaries, both freed at once
    assert 8 * 2 ** 20 <= heap.peak < 9 * 2 ** 20
    with HeapPeak() as heap:
        x.sum()
    assert heap.peak < 2 ** 16


@pytest.mark.skipif(not heap_peak_available(), reason="needs glibc's mallinfo2")
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_piggyback_training_needs_no_more_memory_than_fine_tuning(kind):
    """Two training steps of one layer, from the built layer: Piggyback holds one
    weight-sized tensor at a time (the masked weight, then dL/dS) where fine-tuning holds
    dL/dW, so its peak is at most fine-tuning's: no work buffer is kept across layers or
    steps."""
    def build():
        torch.manual_seed(0)
        return nn.Linear(1024, 1024) if kind == "linear" else nn.Conv2d(256, 256, 3, padding=1)
    x = torch.randn((8, 1024) if kind == "linear" else (2, 256, 4, 4))
    tuned = build()
    layer = PiggybackLayer(build().requires_grad_(False), TaskContext())
    layer.add_task(0)
    layer.context.task = 0
    tuned(x).sum().backward()  # the GEMM library's cached workspace: outside the count
    tuned.zero_grad(set_to_none=True)
    peaks = []
    for params, forward in (([tuned.weight, tuned.bias], tuned),
                            ([layer.tasks["0"].mask.scores], layer)):
        with HeapPeak() as heap:
            for _ in range(2):
                for p in params:
                    p.grad = None
                forward(x).sum().backward()
        peaks.append(heap.peak)
    weight_bytes = tuned.weight.numel() * 4
    assert peaks[0] >= weight_bytes  # fine-tuning's dL/dW is seen
    assert peaks[1] <= peaks[0] + weight_bytes // 16  # a kept buffer would add weight_bytes


@pytest.mark.parametrize("path", ["fold", "activations"])
def test_fused_paths_under_bf16_autocast_return_gradients_in_the_inputs_dtypes(path):
    layer, task, x = _rkr_layer("conv", masks=True)
    layer.path = path
    reference_out, reference = _backward(layer, task, x, layer.forward_train(x, task),
                                         torch.ones(2, 5, 4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer.forward_train(x, task)
    assert out.dtype == torch.bfloat16
    out, grads = _backward(layer, task, x, out, torch.ones(out.shape, dtype=out.dtype))
    assert (out.float() - reference_out).norm() < 0.02 * reference_out.norm()
    for low, full in zip(grads, reference):
        assert low.dtype == full.dtype == torch.float32
        assert nn.functional.cosine_similarity(low.flatten(), full.flatten(), dim=0) > 0.99


def test_single_task_minibatch_is_not_copied_and_equals_the_mixed_path():
    net, _, x = _network("resnet", "rkr")
    net.add_task(1, 2)
    net.max_class_label = 3  # what Avalanche's adaptation sets for tasks of 3 and 2 classes
    seen = []
    net.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    net.eval()
    with torch.no_grad():
        per_task = [net.forward_single_task(x, t) for t in (0, 1)]
        for labels in (torch.ones(4, dtype=torch.long), torch.tensor([0, 1, 1, 0])):
            seen.clear()
            out = net(x, labels)
            assert out.shape == (4, 3)
            for row, task in enumerate(labels.tolist()):
                logits = per_task[task][row]
                torch.testing.assert_close(out[row, :len(logits)], logits)
            assert (seen[0] is x) == bool((labels == 1).all())  # one task: no copy


@pytest.mark.parametrize("method", METHODS)
def test_a_bf16_network_creates_its_task_parameters_and_heads_in_bf16(method):
    build, size = MODELS["resnet"]
    net = convert(build().to(torch.bfloat16), method)
    for task in ([0, 1] if method == "mask-rkr" else [0]):
        net.add_task(task, 3)
        params = net.trainable_parameters([task])
        assert params and all(p.dtype == torch.bfloat16 for p in params)
        out = net.train().forward_single_task(torch.randn(2, 3, size, size,
                                                          dtype=torch.bfloat16), task)
        out.float().square().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in params)
        net.finish_task(task)


def test_fold_cache_follows_the_network_to_another_dtype():
    """``.to()`` replaces the parameters' data without bumping their versions: the folded
    weights must be computed again, in the new dtype (or on the new device)."""
    net, task, x = _network("vit", "rkr")
    net.finish_task(task)
    net.eval()
    with torch.no_grad():
        single = net.forward_single_task(x, task)
        net.to(torch.float64)
        double = net.forward_single_task(x.double(), task)
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), single, rtol=1e-4, atol=1e-5)


class _CountNonzero(torch.overrides.TorchFunctionMode):
    """Counts the calls of ``nonzero`` (a host sync on GPU) inside the block."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func in (torch.nonzero, torch.Tensor.nonzero)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["rkr", "mask-rkr"])
def test_near_zero_scales_are_found_once_per_network_forward(method):
    """The network finds every RKR layer's near-zero scales with one ``nonzero`` before
    its backbone runs; each layer then gets exactly the channels it would find itself
    (offsets across layers), and finds them itself outside a network forward."""
    net, task, x = _network("vit", method)
    layers = [m for m in net.modules() if isinstance(m, RKRLayer)]
    if method == "rkr":  # exact zeros in the first and the third layer (Mask-RKR: masks)
        with torch.no_grad():
            layers[0].tasks["0"].f[[1, 4]] = 0.0
            layers[2].tasks["0"].f[-1] = 0.0
    own = [near_zero(layer.factors(task)[2].detach()).nonzero().flatten() for layer in layers]
    assert sum(map(len, own)) > 0 and sum(len(s) == 0 for s in own) < len(own)
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(m.zero_scales[2]))
             for layer in layers]
    with _CountNonzero() as counter:
        net.forward_single_task(x, task).sum().backward()
    for hook in hooks:
        hook.remove()
    assert counter.calls == 1 < len(layers)
    assert len(seen) == len(layers) and all(torch.equal(a, b) for a, b in zip(seen, own))
    assert all(layer.zero_scales is None for layer in layers)
    with _CountNonzero() as counter:
        net.context.task = task
        net.backbone(x).sum().backward()
        net.context.task = None
    assert counter.calls == len(layers)


class _CountProducts(torch.overrides.TorchFunctionMode):
    """Counts the elementwise products (``*``, ``torch.mul``, ``addcmul_``) in the block."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func in (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__,
                               torch.Tensor.addcmul_)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape", [(700, 96), (3, 8, 20, 20)])
def test_scale_gradient_sums_in_blocks_on_cpu_and_in_one_product_elsewhere(shape):
    """sum(g * y) over all but the channel axis: on CPU in cache-sized blocks, equal to
    the plain sum; on any other device (here "meta", as a GPU would) in one product, not
    a kernel launch per block."""
    op = LinearOp() if len(shape) == 2 else ConvOp()
    g, y = torch.randn(shape), torch.randn(shape)
    with _CountProducts() as cpu:
        blocked = _channel_dot(op, g, y, chunk=4096)
    expected = (g * y).sum(0) if len(shape) == 2 else (g * y).sum((0, 2, 3))
    torch.testing.assert_close(blocked, expected, rtol=1e-5, atol=1e-5)
    assert cpu.calls > 2
    with _CountProducts() as other:
        out = _channel_dot(op, g.to("meta"), y.to("meta"), chunk=4096)
    assert other.calls == 1 and out.shape == expected.shape
