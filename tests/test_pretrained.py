"""The methods in the paper's setting: a frozen pretrained backbone (SPEC sections 1, 5).

No pretrained weights can be downloaded here, so a pretrained proxy stands in
(:mod:`avalanche_maskrkr.benchmarks.proxy`): timm's ``test_efficientnet`` (BatchNorm,
depthwise convolutions) and a small ``test_vit``, trained on synthetic shapes, saved,
reloaded through the package's weights loader and frozen. New tasks: digits at 16 px,
normalised with the backbone's mean and std. Each method is driven as a user would, with
default options and ``Adam(model.parameters(), lr=1e-3)``; the reference is the linear
probe (multi-head on the frozen base) under the same optimizer, schedule and seed.
"""
import warnings

import pytest
import safetensors.torch
import timm
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin

import avalanche_maskrkr as amr
from avalanche_maskrkr.benchmarks import split_digits
from avalanche_maskrkr.benchmarks.probe_check import METHODS, compare_with_probe
from avalanche_maskrkr.benchmarks.proxy import SHAPES, pretrain_proxy
from avalanche_maskrkr.benchmarks.transforms import resolve_input_spec
from avalanche_maskrkr.checkpoint import WeightsError, load_weights
from avalanche_maskrkr.config import (DEFAULT_LR, PRETRAINED_LR, RunConfig, Variant, resolve,
                                      strategy_lr, strategy_options)
from avalanche_maskrkr.layers import TaskBatchStats
from avalanche_maskrkr.network import NEVER_TRAINED
from avalanche_maskrkr.runner import run

PROXIES = {"cnn": ("test_efficientnet", {}, dict(samples=3000, epochs=4)),
           "vit": ("test_vit", dict(img_size=16, patch_size=4, depth=2),
                   dict(samples=3000, epochs=12))}
SIZE = 16
MARGIN = 0.1
"""Allowed shortfall of a method's per-task accuracy (mean over seeds) below the probe's.
After 2 epochs (16 steps) the probe's own accuracy on one task spreads over up to 0.4
between seeds (measured: 0.55 to 0.96 on digits 6/7)."""
MEAN_MARGIN = 0.03
"""Allowed shortfall of a method's mean over tasks. Mask-RKR's later tasks start from the
first task's factors with every mask at one, and after 16 steps at the masks' rate
(1e-4) few masks have moved: measured 0.909 against the probe's 0.931 (3 seeds)."""


@pytest.fixture(scope="module")
def proxy_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("proxy")
    return {kind: pretrain_proxy(name, folder / f"{kind}.safetensors", image_size=SIZE, **train,
                                 **kwargs)
            for kind, (name, kwargs, train) in PROXIES.items()}


def _pretrained(kind, weights):
    name, kwargs, _ = PROXIES[kind]
    model = timm.create_model(name, num_classes=len(SHAPES), **kwargs)
    load_weights(model, weights[kind])
    return model


def _quiet_evaluator():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EvaluationPlugin(loggers=[])


def _digits(kind, weights, seed, test_fraction=0.3):
    spec = resolve_input_spec(_pretrained(kind, weights))
    return split_digits(5, image_size=SIZE, channels=3, seed=seed, mean_std=spec.mean_std,
                        test_fraction=test_fraction)


def _assert_at_least_the_probe(kind, weights, epochs, seeds, tasks, test_fraction=0.3):
    """Each method's per-task accuracy (mean over ``seeds``) at least the probe's, less
    :data:`MARGIN`, and its mean over tasks at least the probe's less
    :data:`MEAN_MARGIN`; zero forgetting (checked by ``compare_with_probe``)."""
    table = compare_with_probe(lambda: _pretrained(kind, weights),
                               lambda seed: _digits(kind, weights, seed, test_fraction),
                               epochs, seeds, tasks)
    probe = table.loc["probe"]
    assert probe.max() > 0.75, table  # the reference itself learned
    for method in METHODS:
        row = table.loc[method]
        assert (row >= probe - MARGIN).all() and row["mean"] >= probe["mean"] - MEAN_MARGIN, \
            table


def test_short_schedule_reaches_the_linear_probe_on_a_batchnorm_cnn(proxy_weights):
    """2 epochs, 5 tasks, 3 seeds: every method at least the probe on every task."""
    _assert_at_least_the_probe("cnn", proxy_weights, epochs=2, seeds=(0, 1, 2), tasks=5)


def test_long_schedule_does_not_collapse_on_a_batchnorm_cnn(proxy_weights):
    """30 epochs (150 steps per task on 40 % of the digits): masks moving for long on a
    frozen BatchNorm network must not collapse the features (each method at least the
    probe)."""
    _assert_at_least_the_probe("cnn", proxy_weights, epochs=30, seeds=(0,), tasks=2,
                               test_fraction=0.6)


def test_vit_reaches_the_linear_probe(proxy_weights):
    _assert_at_least_the_probe("vit", proxy_weights, epochs=10, seeds=(0,), tasks=2,
                               test_fraction=0.6)


# -- what makes it work ----------------------------------------------------------------
class GroupRecorder(SupervisedPlugin):
    """Records the optimizer's groups and the network's trainable parameters as each
    experience starts training."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def before_training_epoch(self, strategy, **kwargs):
        if strategy.clock.train_exp_epochs == 0:
            task = strategy.experience.task_label
            self.seen.append(([{**g, "params": [id(p) for p in g["params"]]}
                               for g in strategy.optimizer.param_groups],
                              strategy.model.parameter_roles([task])))


@pytest.mark.parametrize("method", METHODS)
def test_the_optimizer_is_pointed_by_role_with_each_roles_rate(method, proxy_weights):
    """Under the usual Adam(model.parameters(), lr=1e-3): the head and real-valued
    factors at 1e-3, mask scores at 1e-4; the optimizer's other settings kept."""
    model = _pretrained("cnn", proxy_weights)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.9),
                                 weight_decay=1e-5)
    recorder = GroupRecorder()
    strategy = METHODS[method](model=model, optimizer=optimizer, train_mb_size=64,
                               train_epochs=1, evaluator=_quiet_evaluator(),
                               plugins=[recorder])
    bench = _digits("cnn", proxy_weights, 0)
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    expected = {"rkr": [{"head": 1e-3, "factors": 1e-3}] * 2,
                "piggyback": [{"head": 1e-3, "masks": 1e-4}] * 2,
                "mask-rkr": [{"head": 1e-3, "factors": 1e-3}, {"head": 1e-3, "masks": 1e-4}]}
    for (groups, roles), rates in zip(recorder.seen, expected[method]):
        groups = {g["role"]: g for g in groups}
        assert {role: g["lr"] for role, g in groups.items()} == rates
        assert all(g["betas"] == (0.8, 0.9) and g["weight_decay"] == 1e-5
                   for g in groups.values())
        assert {role: g["params"] for role, g in groups.items()} == {
            role: [id(p) for p in params] for role, params in roles.items() if params}


def test_role_rates_are_options_and_the_papers_recipe_is_reachable(proxy_weights):
    model = _pretrained("cnn", proxy_weights)
    strategy = amr.Piggyback(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                             train_mb_size=64, train_epochs=1, evaluator=_quiet_evaluator(),
                             head_lr=1e-4, mask_lr=1e-4, bn_policy="frozen")
    strategy.train(_digits("cnn", proxy_weights, 0).train_stream[0])
    assert {g["role"]: g["lr"] for g in strategy.optimizer.param_groups} == {
        "head": 1e-4, "masks": 1e-4}
    with pytest.raises(ValueError, match="mask_lr must be > 0"):
        amr.Piggyback(model=_pretrained("cnn", proxy_weights), mask_lr=0.0,
                      optimizer=torch.optim.Adam(model.parameters()))


def test_a_users_groups_with_other_settings_are_refused_not_flattened(proxy_weights):
    model = _pretrained("cnn", proxy_weights)
    classifier = set(map(id, model.get_classifier().parameters()))
    groups = [{"params": [p for p in model.parameters() if id(p) not in classifier]},
              {"params": list(model.get_classifier().parameters()), "lr": 1e-2}]
    strategy = amr.RKR(model=model, optimizer=torch.optim.Adam(groups, lr=1e-3),
                       train_mb_size=64, evaluator=_quiet_evaluator())
    with pytest.raises(ValueError, match="groups with different settings.*head_lr"):
        strategy.train(_digits("cnn", proxy_weights, 0).train_stream[0])


def test_task_statistics_are_the_adapted_networks_own(proxy_weights):
    """bn_policy="task_stats": after training, each task's BatchNorm
    statistics are the mean and (unbiased) variance of that BatchNorm's input over the
    task's training inputs, computed through the task's final adapted network; the base
    statistics do not move; two vectors per BatchNorm layer per task are counted."""
    model = _pretrained("cnn", proxy_weights)
    base_stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    strategy = amr.Piggyback(model=model, optimizer=torch.optim.Adam(model.parameters()),
                             train_mb_size=64, train_epochs=1, eval_mb_size=4096,
                             evaluator=_quiet_evaluator(), bn_policy="task_stats")
    exp = _digits("cnn", proxy_weights, 0).train_stream[0]
    net = strategy.model
    layers = [m for m in net.modules() if isinstance(m, TaskBatchStats)]
    last_input = {}  # the estimation after training is the last pass (one batch)
    for layer in layers:
        layer.base.register_forward_pre_hook(
            lambda m, args, layer=layer: last_input.__setitem__(layer, args[0]))
    strategy.train(exp)
    for layer in layers:
        x = last_input[layer].transpose(0, 1).flatten(1)
        assert x.shape[1] == len(exp.dataset) * last_input[layer][0, 0].numel()
        stats = layer.tasks["0"]
        torch.testing.assert_close(stats.running_mean, x.mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.running_var, x.var(1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="task 0 is finished"):
        net.estimate_statistics(0, [])
    after = {k.replace(".base.", "."): v for k, v in net.backbone.state_dict().items()
             if "running" in k and ".tasks." not in k}
    assert all(torch.equal(after[k], v) for k, v in base_stats.items())
    cost = sum(layer.task_cost(0).real for layer in layers)
    assert cost == 2 * sum(layer.base.num_features for layer in layers)


def test_weights_without_integer_buffers_load_and_real_gaps_are_named(tmp_path, proxy_weights):
    state = safetensors.torch.load_file(proxy_weights["cnn"])
    stripped = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(stripped) < len(state)
    path = tmp_path / "exported.safetensors"
    safetensors.torch.save_file(stripped, str(path))
    model = timm.create_model("test_efficientnet", num_classes=2)
    load_weights(model, path)
    for name, tensor in model.state_dict().items():
        if name in stripped and not name.startswith("classifier."):
            assert torch.equal(tensor, stripped[name]), name
    del stripped["bn1.running_mean"]
    safetensors.torch.save_file(stripped, str(path))
    with pytest.raises(WeightsError, match=r"missing keys \['bn1\.running_mean'\]"):
        load_weights(timm.create_model("test_efficientnet", num_classes=2), path)


def test_a_frozen_base_that_never_saw_data_is_named_once(proxy_weights):
    with pytest.warns(UserWarning, match="never been updated.*train_base_first") as caught:
        amr.convert(timm.create_model("test_efficientnet", num_classes=2), "piggyback")
    assert sum(NEVER_TRAINED in str(w.message) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        amr.convert(timm.create_model("test_efficientnet", num_classes=2), "piggyback",
                    train_base_first=True)
        amr.convert(_pretrained("cnn", proxy_weights), "piggyback")


# -- the runner on pretrained weights ----------------------------------------------------
def test_runner_rates_follow_the_setting():
    """From scratch (the digits job): each strategy's tuned rate, masks at that rate; on
    pretrained weights: the usual 1e-3, split by role (masks at 1e-4)."""
    scratch = resolve(RunConfig())
    weights = resolve(RunConfig(weights="model.safetensors"))
    for name in ("rkr", "piggyback", "mask-rkr", "naive"):
        variant = Variant(name, name)
        assert strategy_lr(scratch, variant) == DEFAULT_LR[name]
        assert strategy_lr(weights, variant) == PRETRAINED_LR == 1e-3
        assert "mask_lr" not in strategy_options(weights, variant)
    assert strategy_options(scratch, Variant("piggyback", "piggyback"))["mask_lr"] == 1e-3
    assert "mask_lr" not in strategy_options(scratch, Variant("rkr", "rkr"))


def test_runner_on_pretrained_weights_reaches_the_probe_without_forgetting(tmp_path,
                                                                          proxy_weights):
    """The runner's defaults with --weights: the methods at least the linear probe
    (multi-head on the frozen base) on average, forgetting exactly 0; digits normalised
    with the backbone's mean and std."""
    config = RunConfig(model="test_efficientnet", img_size=SIZE, weights=str(proxy_weights["cnn"]),
                       strategies=("multi-head", *METHODS), tasks=2, epochs=3,
                       out=str(tmp_path))
    summary = run(config).summary.set_index("strategy")
    probe = summary.loc["multi-head", "avg_accuracy"]
    assert probe > 0.75, summary
    for method in METHODS:
        assert summary.loc[method, "avg_accuracy"] >= probe - MEAN_MARGIN, summary
        assert summary.loc[method, "forgetting"] == 0.0, summary
