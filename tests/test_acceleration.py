"""AccelerationPlugin on real strategies (CPU): autocast placement, fp16 loss scaling,
channels-last, compiled backbone, data-loader arguments."""
import copy
from collections import OrderedDict

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.supervised import Naive
from torch import nn

from avalanche_maskrkr import RKR, Piggyback, convert
from avalanche_maskrkr.acceleration import AccelerationPlugin, LossScaler, loader_kwargs
from avalanche_maskrkr.benchmarks import split_digits


@pytest.fixture(scope="module")
def digits():
    return split_digits(n_experiences=5)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        flat=nn.Flatten(), fc1=nn.Linear(64, 32), act1=nn.ReLU(), fc2=nn.Linear(32, 32),
        act2=nn.ReLU(), head=nn.Linear(32, 2)))


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 8, 3, padding=1), act1=nn.ReLU(), conv2=nn.Conv2d(8, 8, 3),
        act2=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(8, 2)))


class Probe(SupervisedPlugin):
    """Records what the hooks after the acceleration plugin see."""

    def __init__(self, corrupt_first_step=False):
        super().__init__()
        self.seen: list[dict] = []
        self.corrupt_first_step = corrupt_first_step

    def before_training(self, strategy, **kwargs):
        self.features: list[torch.dtype] = []
        strategy.model.backbone.register_forward_hook(
            lambda module, inputs, out: self.features.append(out.dtype))

    def after_forward(self, strategy, **kwargs):
        self.seen.append({"autocast_forward": torch.is_autocast_enabled("cpu"),
                          "out_dtype": strategy.mb_output.dtype,
                          "x_channels_last": strategy.mb_x.is_contiguous(
                              memory_format=torch.channels_last)})

    def after_backward(self, strategy, **kwargs):
        self.seen[-1]["autocast_backward"] = torch.is_autocast_enabled("cpu")
        self.seen[-1]["loss"] = strategy.loss.item()
        if self.corrupt_first_step and len(self.seen) == 1:
            params = strategy.optimizer.param_groups[0]["params"]
            params[0].grad.view(-1)[0] = float("inf")

    def after_eval_forward(self, strategy, **kwargs):
        self.seen.append({"eval_out_dtype": strategy.mb_output.dtype})


def _run(strategy_class, model, stream, plugins, experiences=1, **kwargs):
    strategy = strategy_class(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=64, train_epochs=1, eval_mb_size=128, plugins=plugins,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]), **kwargs)
    for exp in stream[:experiences]:
        strategy.train(exp, eval_streams=[])
    return strategy


def _eval_outputs(strategy, stream, tasks):
    net = strategy.model.eval()
    with torch.no_grad():
        return [net(torch.stack([x for x, _, _ in stream[t].dataset][:16]),
                    torch.full((16,), t)) for t in tasks]


def test_bf16_autocast_covers_forward_and_loss_not_backward(digits):
    probe = Probe()
    strategy = _run(RKR, _mlp(), digits.train_stream, [AccelerationPlugin("bf16"), probe])
    strategy.eval(digits.test_stream[:1])
    train = [s for s in probe.seen if "out_dtype" in s]
    assert train and all(s["autocast_forward"] and not s["autocast_backward"] for s in train)
    assert probe.features[-1] == torch.bfloat16  # evaluation ran the backbone in bf16
    # logits come back in fp32, as Avalanche's multi-task forward needs
    assert {s.get("out_dtype", s.get("eval_out_dtype")) for s in probe.seen} == {torch.float32}
    assert not torch.is_autocast_enabled("cpu")  # nothing leaks out of the strategy
    factors = strategy.model.task_modules[0].tasks["0"]
    assert factors.rm.dtype == torch.float32 and factors.rm.abs().sum() > 0  # it trained


def test_loss_scaler_rules():
    scaler = LossScaler(init_scale=8.0, growth=2.0, backoff=0.5, interval=2)
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 8.0)
    assert not scaler.unscale([p]) and torch.equal(p.grad, torch.ones(3))
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 16.0
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    assert scaler.unscale([p])
    scaler.update(True)
    assert scaler.scale == 8.0 and scaler.good_steps == 0


def test_fp16_scales_the_loss_and_skips_non_finite_steps(digits):
    model = _mlp()
    probe = Probe(corrupt_first_step=True)
    plugin = AccelerationPlugin("fp16")
    strategy = RKR(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                   train_mb_size=64, train_epochs=1, plugins=[plugin, probe],
                   evaluator=EvaluationPlugin(loggers=[]))
    head_before = {}

    class Snapshot(SupervisedPlugin):
        def before_update(self, strategy, **kwargs):
            head_before.setdefault(len(probe.seen), strategy.model.heads["0"].weight.clone())

        def after_update(self, strategy, **kwargs):
            same = torch.equal(head_before[len(probe.seen)], strategy.model.heads["0"].weight)
            probe.seen[-1]["step_skipped"] = same

    strategy.plugins.append(Snapshot())
    strategy.train(digits.train_stream[0], eval_streams=[])
    assert [s["step_skipped"] for s in probe.seen] == [True] + [False] * (len(probe.seen) - 1)
    assert plugin.scaler.scale == 2.0 ** 15  # halved once
    assert all(s["loss"] < 10 for s in probe.seen)  # metrics see the unscaled loss


def test_channels_last_model_and_inputs_same_results(digits):
    stream = digits.train_stream
    probe = Probe()
    fast = _run(Piggyback, _cnn(), stream, [AccelerationPlugin(channels_last=True), probe], 2)
    plain = _run(Piggyback, _cnn(), stream, [], 2)
    assert all(s["x_channels_last"] for s in probe.seen)
    conv = fast.model.backbone.conv2
    assert conv.base.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.tasks["1"].mask.bits is not None  # the second task trained and finished
    for a, b in zip(_eval_outputs(fast, stream, [0, 1]), _eval_outputs(plain, stream, [0, 1])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compiled_backbone_keeps_task_labels_and_state_keys(digits):
    stream = digits.train_stream
    compiled = _run(RKR, _mlp(), stream, [AccelerationPlugin(compile={"backend": "eager"})], 2)
    plain = _run(RKR, _mlp(), stream, [], 2)
    assert compiled.model.backbone._compiled_call_impl is not None
    assert plain.model.backbone._compiled_call_impl is None
    assert compiled.model.state_dict().keys() == plain.model.state_dict().keys()
    for a, b in zip(_eval_outputs(compiled, stream, [0, 1]), _eval_outputs(plain, stream, [0, 1])):
        torch.testing.assert_close(a, b)
    model = _mlp()
    with pytest.raises(TypeError, match="backbone"):
        _run(Naive, model, stream, [AccelerationPlugin(compile=True)])


@pytest.mark.parametrize("method", ["rkr", "piggyback", "mask-rkr"])
def test_compiled_backbone_has_no_graph_breaks_and_matches_eager(method):
    """Each forward of the compiled backbone runs one graph (no graph break: no
    host-synchronising op in the fused training paths, no version check of the fold cache
    inside the backbone in evaluation). It trains exactly like the eager one, also while
    Mask-RKR's masked scales change which channels are zero from step to step, and its
    evaluation follows an in-place change of what a cached fold was computed from."""
    torch.manual_seed(0)
    backbone = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(1, 8, 3, padding=1), act1=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(2),
        flat=nn.Flatten(), fc=nn.Linear(32, 16), act2=nn.ReLU(), head=nn.Linear(16, 2)))
    net = convert(backbone, method)
    task = 1 if method == "mask-rkr" else 0
    for t in range(task + 1):
        net.add_task(t, 2)
    if task:
        net.finish_task(0)
    nets = [net.train(), copy.deepcopy(net)]
    graph_calls = []

    def backend(gm, example_inputs):  # Dynamo's "eager" backend, counting
        def run(*args):
            graph_calls[-1] += 1
            return gm.forward(*args)
        return run

    torch._dynamo.reset()
    nets[0].backbone.compile(backend=backend)
    g = torch.Generator().manual_seed(1)
    x, labels = torch.randn(4, 1, 6, 6, generator=g), torch.full((4,), task)

    def forward_both(grad: bool):
        graph_calls.append(0)
        params = nets[0].trainable_parameters([task]) if grad else []
        noise = [torch.randn(p.shape, generator=g) * 1e-2 for p in params]
        results = []
        for net in nets:
            params = net.trainable_parameters([task]) if grad else []
            with torch.no_grad():
                for p, n in zip(params, noise):
                    p.add_(n)  # mask scores around the threshold: bits flip
            with torch.set_grad_enabled(grad):
                out = net(x, labels)
            results.append((out, torch.autograd.grad(out.square().sum(), params) if grad else ()))
        (out, grads), (eager_out, eager_grads) = results
        torch.testing.assert_close(out, eager_out)
        for a, b in zip(grads, eager_grads):
            torch.testing.assert_close(a, b)

    for _ in range(3):
        forward_both(grad=True)
    for net in nets:
        net.finish_task(task)
        net.eval()
    for _ in range(2):
        forward_both(grad=False)  # the folds are computed, then reused
    with torch.no_grad():
        for net in nets:
            net.backbone.fc.base.weight.mul_(0.5)
    forward_both(grad=False)
    assert graph_calls == [1] * 6
    torch._dynamo.reset()


def _compiled_calls_per_task(stream, **plugin_kwargs) -> list[int]:
    """Calls of compiled graphs while each experience of ``stream`` trains."""
    calls: list[int] = []

    def backend(gm, example_inputs):  # Dynamo's "eager" backend, counting
        def run(*args):
            calls[-1] += 1
            return gm.forward(*args)
        return run

    torch._dynamo.reset()  # the limits also count the entries other tests compiled
    plugin = AccelerationPlugin(compile={"backend": backend}, **plugin_kwargs)
    model = _cnn()  # its RKR convolutions recompile for every new task
    strategy = RKR(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                   train_mb_size=64, plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]))
    for exp in stream:
        calls.append(0)
        strategy.train(exp, eval_streams=[])
    return calls


def test_compiled_backbone_keeps_compiling_past_dynamo_recompile_limit():
    stream = split_digits(n_experiences=10).train_stream  # 10 tasks of one digit each
    config = torch._dynamo.config
    with config.patch(recompile_limit=8, accumulated_recompile_limit=256):  # the defaults
        calls = _compiled_calls_per_task(stream)
        assert calls[0] > 0 and calls == calls[:1] * len(stream)  # all compiled, to the last
        assert config.recompile_limit == config.accumulated_recompile_limit == 256
        # the mechanism matters: at Dynamo's limit (never lowered) tasks fall back to eager
        config.recompile_limit = 8
        calls = _compiled_calls_per_task(stream, recompile_limit=1)
        assert config.recompile_limit == 8 and calls[-1] < calls[0]
    torch._dynamo.reset()


def test_loader_kwargs_reach_avalanche_loaders(digits):
    assert loader_kwargs("cpu") == {"num_workers": 0, "pin_memory": False,
                                    "persistent_workers": False}
    on_gpu = loader_kwargs("cuda", num_workers=4)
    assert on_gpu == {"num_workers": 4, "pin_memory": True, "persistent_workers": True}
    seen = {}

    class Loader(SupervisedPlugin):
        def before_training_epoch(self, strategy, **kwargs):
            seen.update(strategy.dataloader.loader_kwargs)

    model = _mlp()
    strategy = RKR(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                   train_mb_size=64, plugins=[Loader()], evaluator=EvaluationPlugin(loggers=[]))
    strategy.train(digits.train_stream[0], eval_streams=[],
                   **loader_kwargs("cpu", num_workers=1))
    assert strategy.model.trained_tasks == [0]
    assert seen["num_workers"] == 1 and seen["persistent_workers"] and not seen["pin_memory"]
    with pytest.raises(ValueError, match="precision"):
        AccelerationPlugin("fp8")


def test_speed_options_of_the_strategies_add_the_acceleration_plugin(digits):
    stream = digits.train_stream
    fast = _run(Piggyback, _cnn(), stream, [], precision="bf16", channels_last=True)
    [plugin] = [p for p in fast.plugins if isinstance(p, AccelerationPlugin)]
    assert plugin.precision == "bf16" and plugin.channels_last
    convs = [p for p in fast.model.parameters() if p.dim() == 4 and p.shape[1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last)
                         and not p.is_contiguous() for p in convs)
    plain = _run(Piggyback, _cnn(), stream, [], precision="fp32")
    assert not any(isinstance(p, AccelerationPlugin) for p in plain.plugins)
    with pytest.raises(ValueError, match="precision"):
        RKR(model=_mlp(), optimizer=torch.optim.SGD(_mlp().parameters(), lr=0.1),
            precision="fp8")
