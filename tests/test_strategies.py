"""Behaviour of the strategies and plugins inside Avalanche (SPEC sections 1-3)."""
import copy
import inspect
import warnings

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from sklearn.datasets import load_digits

import avalanche_maskrkr as amr
from avalanche_maskrkr.accounting import method_cost
from avalanche_maskrkr.benchmarks import split_digits
from avalanche_maskrkr.layers import BinaryMask, TaskBatchNorm, TaskBatchStats
from avalanche_maskrkr.options import make_options
from backbones import BACKBONES, DIGITS_KW, mlp

STRATEGIES = {"rkr": amr.RKR, "piggyback": amr.Piggyback, "mask-rkr": amr.MaskRKR}
PLUGINS = {"rkr": amr.RKRPlugin, "piggyback": amr.PiggybackPlugin, "mask-rkr": amr.MaskRKRPlugin}


def _evaluator():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                forgetting_metrics(experience=True, stream=True), loggers=[])


def _strategy(method, model, epochs=1, plugins=(), lr=3e-3, **options):
    torch.manual_seed(0)
    return STRATEGIES[method](
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=lr), train_mb_size=16,
        train_epochs=epochs, eval_mb_size=512, evaluator=_evaluator(), plugins=list(plugins),
        **options)


def _outputs(strategy, inputs, task):
    strategy.model.eval()
    with torch.no_grad():
        return strategy.model(inputs, task)


@pytest.mark.parametrize("method", STRATEGIES)
@pytest.mark.parametrize("kind", BACKBONES)
def test_digits_learns_without_forgetting(kind, method):
    """Well above chance on digits, earlier tasks bit-for-bit unchanged, forgetting 0,
    and the usual whole-stream evaluation works before tasks are trained.

    Mask-RKR's later tasks only choose among the first task's factors; on models this
    small it needs the K+ regime (a larger rank) and a gentler learning rate for its mask
    scores (a zeroed scaling factor silences a whole channel)."""
    bench = split_digits(**DIGITS_KW[kind])
    torch.manual_seed(0)
    options = {"rank": 16, "lr": 1e-3} if method == "mask-rkr" else {}
    strategy = _strategy(method, BACKBONES[kind](), epochs=6, train_base_first=True, **options)
    probes = [torch.stack([exp.dataset[i][0] for i in range(32)]) for exp in bench.test_stream]
    reference = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for task, exp in enumerate(bench.train_stream):
            strategy.train(exp)
            results = strategy.eval(bench.test_stream)
            reference[task] = _outputs(strategy, probes[task], task)
            for earlier in range(task):
                assert torch.equal(_outputs(strategy, probes[earlier], earlier), reference[earlier])
    untrained = [w for w in caught if "has not been trained" in str(w.message)]
    assert len(untrained) == 4  # tasks 1..4, once each, at the first evaluation
    forgetting = {k: v for k, v in results.items() if "Forgetting" in k}
    assert forgetting and all(v == 0.0 for v in forgetting.values())
    accuracies = [v for k, v in results.items() if k.startswith("Top1_Acc_Exp")]
    assert len(accuracies) == 5 and sum(accuracies) / 5 > 0.65, accuracies


@pytest.mark.parametrize("method", STRATEGIES)
def test_plugin_on_naive_matches_the_strategy(method):
    bench = split_digits()
    outputs = []
    for use_plugin in (False, True):
        torch.manual_seed(0)
        model = mlp()
        if use_plugin:
            torch.manual_seed(0)
            strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
                             train_mb_size=16, eval_mb_size=512, evaluator=_evaluator(),
                             plugins=[PLUGINS[method](rank=3) if method != "piggyback"
                                      else PLUGINS[method]()])
        else:
            options = {} if method == "piggyback" else {"rank": 3}
            strategy = _strategy(method, model, **options)
        for exp in bench.train_stream[:3]:
            strategy.train(exp)
        x = bench.test_stream[1].dataset[0][0].unsqueeze(0)
        outputs.append([_outputs(strategy, x, t) for t in range(3)])
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


def test_mixed_task_minibatch_is_split_per_task():
    bench = split_digits()
    strategy = _strategy("mask-rkr", mlp())
    for exp in bench.train_stream[:3]:
        strategy.train(exp)
    xs = [torch.stack([bench.test_stream[t].dataset[i][0] for i in range(5)]) for t in range(3)]
    labels = torch.tensor([0, 2, 1, 0, 2, 1, 1, 0, 2, 0, 1, 2, 2, 1, 0])
    counters = [0, 0, 0]
    rows = []
    for t in labels.tolist():
        rows.append(xs[t][counters[t]])
        counters[t] += 1
    mixed = _outputs(strategy, torch.stack(rows), labels)
    counters = [0, 0, 0]
    for row, t in zip(mixed, labels.tolist()):
        expected = _outputs(strategy, xs[t], t)[counters[t]]
        counters[t] += 1
        torch.testing.assert_close(row[:2], expected, rtol=1e-6, atol=1e-6)


def test_repeated_task_label_is_refused_and_leaves_the_task_intact():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    data = _make_taskaware_tensor_classification_dataset(x, torch.tensor(digits.target))
    class_incremental = nc_benchmark(data, data, n_experiences=5, task_labels=False, seed=0)
    strategy = _strategy("rkr", mlp())
    strategy.train(class_incremental.train_stream[0])
    model = strategy.model

    def snapshot():
        model.eval()
        with torch.no_grad():
            outputs = [model(x[:8], torch.zeros(8, dtype=torch.long)), model(x[:8], None)]
        return (copy.deepcopy(model.state_dict()), model.max_class_label,
                set(model.known_train_tasks_labels), outputs)

    before = snapshot()
    with pytest.raises(ValueError, match=r"task label 0.*task_labels=True"):
        strategy.train(class_incremental.train_stream[1])
    after = snapshot()
    assert before[0].keys() == after[0].keys()
    for key, value in before[0].items():  # tensors and the task structure alike
        assert torch.equal(value, after[0][key]) if isinstance(value, torch.Tensor) \
            else value == after[0][key], key
    assert before[1:3] == after[1:3]
    (padded, every_task), (padded_after, every_task_after) = before[3], after[3]
    assert torch.equal(padded, padded_after) and every_task.keys() == every_task_after.keys()
    assert all(torch.equal(every_task[t], every_task_after[t]) for t in every_task)


class _OptimizerSpy(SupervisedPlugin):
    """Records, at each experience's first epoch, what the optimizer holds."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def before_training_epoch(self, strategy, **kwargs):
        opt = strategy.optimizer
        params = {id(p) for g in opt.param_groups for p in g["params"]}
        names = {n for n, p in strategy.model.named_parameters() if id(p) in params}
        self.seen.append((names, type(opt), opt.param_groups[0]["lr"], len(opt.state),
                          all(p.requires_grad for g in opt.param_groups for p in g["params"])))


@pytest.mark.parametrize("method", ["mask-rkr", "piggyback"])
def test_optimizer_holds_exactly_the_task_parameters(method):
    bench = split_digits()
    spy = _OptimizerSpy()
    strategy = _strategy(method, mlp(), plugins=[spy], lr=1e-3)
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    (first, cls0, lr0, state0, trainable0), (second, *_rest) = spy.seen
    assert cls0 is torch.optim.Adam and lr0 == 1e-3 and state0 == 0 and trainable0
    assert {n for n in first if n.startswith("heads.")} == {"heads.0.weight", "heads.0.bias"}
    assert {n for n in second if n.startswith("heads.")} == {"heads.1.weight", "heads.1.bias"}
    task0 = {n.rsplit(".", 1)[-1] for n in first if not n.startswith("heads.")}
    task1 = {n.rsplit(".", 1)[-1] for n in second if not n.startswith("heads.")}
    if method == "mask-rkr":  # LM, RM, F on the first task, only mask scores afterwards
        assert task0 == {"lm", "rm", "f"} and task1 == {"scores"}
        assert all(".tasks.1." in n for n in second if not n.startswith("heads."))
    else:  # Piggyback: a mask for every task, the first included
        assert task0 == task1 == {"scores"}
    assert not any(".base." in n for n in first | second)


@pytest.mark.parametrize("method", ["piggyback", "mask-rkr"])
def test_state_dict_round_trip_with_packed_masks(method):
    bench = split_digits()
    strategy = _strategy(method, mlp())
    for exp in bench.train_stream[:3]:
        strategy.train(exp)
    state = strategy.model.state_dict()
    bits = {k: v for k, v in state.items() if k.endswith(".bits")}
    assert bits and all(v.dtype == torch.uint8 for v in bits.values())
    assert not any(k.endswith(".scores") for k in state)
    masks = [m for m in strategy.model.modules() if isinstance(m, BinaryMask)]
    assert sum(v.numel() for v in bits.values()) == sum(-(-m.numel // 8) for m in masks)
    fresh = amr.convert(mlp(), method)
    fresh.load_state_dict(state)
    x = bench.test_stream[0].dataset[0][0].unsqueeze(0)
    for t in range(3):
        assert torch.equal(_outputs(strategy, x, t), fresh.eval()(x, t))
    # what Avalanche's MultiTaskModule keeps: the known tasks (model(x, None)) and width
    assert fresh.known_train_tasks_labels == strategy.model.known_train_tasks_labels == {0, 1, 2}
    assert fresh.max_class_label == strategy.model.max_class_label == 2
    every_task = _outputs(strategy, x, None)
    with torch.no_grad():
        restored = fresh(x, None)
    assert sorted(restored) == [0, 1, 2]
    assert all(torch.equal(restored[t], every_task[t]) for t in range(3))


def test_defaults_are_spec_s():
    """SPEC section 3: K=2, masks initialised at 1e-2 with threshold 5e-3, fused qkv split
    in three, BatchNorm frozen for RKR; as the strategies' signatures say and as built."""
    signature = {name: {p.name: p.default for p in
                        inspect.signature(cls.__init__).parameters.values()}
                 for name, cls in STRATEGIES.items()}
    assert signature["rkr"]["rank"] == signature["mask-rkr"]["rank"] == 2
    assert signature["rkr"]["bn_policy"] == "frozen"
    for method in ("piggyback", "mask-rkr"):
        assert (signature[method]["mask_init"], signature[method]["mask_threshold"]) == (1e-2, 5e-3)
    assert all(signature[method]["split_qkv"] is True for method in STRATEGIES)
    assert (signature["mask-rkr"]["mask_rg"], signature["mask-rkr"]["mask_sfg"],
            signature["mask-rkr"]["mask_placement"]) == (True, True, "factors")
    vit = _strategy("rkr", BACKBONES["vit"]()).model
    qkv = [m for name, m in vit.named_modules() if name.endswith("attn.qkv")]
    assert qkv and all((m.n_split, m.rank) == (3, 2) for m in qkv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random base: "its statistics never updated"
        resnet = _strategy("rkr", BACKBONES["resnet"]()).model.train()
    norms = [m for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert not any(isinstance(m, (TaskBatchNorm, TaskBatchStats)) for m in resnet.modules())
    masked = _strategy("mask-rkr", mlp()).model
    masked.add_task(0, 2), masked.add_task(1, 2)
    masks = [m for m in masked.modules() if isinstance(m, BinaryMask)]
    assert masks and all(m.threshold == 5e-3 and bool((m.scores == 1e-2).all()) for m in masks)


def test_mask_placement_none_is_rkr():
    """SPEC section 3, placement (1): no mask at all, so with RKR's BatchNorm policy, from
    the same seed, the same parameters, outputs and parameter count as RKR."""
    bench = split_digits(**DIGITS_KW["resnet"])
    networks = []
    none = {"mask_placement": "none", "bn_policy": make_options("rkr").bn_policy}
    for method, options in (("rkr", {}), ("mask-rkr", none)):
        torch.manual_seed(0)
        strategy = _strategy(method, BACKBONES["resnet"](), train_base_first=True, **options)
        for exp in bench.train_stream[:2]:
            strategy.train(exp)
        networks.append(strategy.model)
    rkr, none = networks
    assert not any(isinstance(m, BinaryMask) for m in none.modules())
    rkr_state, none_state = rkr.state_dict(), none.state_dict()
    assert rkr_state.keys() == none_state.keys()
    assert all(torch.equal(v, none_state[k]) for k, v in rkr_state.items()
               if isinstance(v, torch.Tensor))
    x = torch.stack([bench.test_stream[1].dataset[i][0] for i in range(4)])
    for task in range(2):
        assert torch.equal(rkr.eval()(x, task), none.eval()(x, task))
    assert method_cost(rkr) == method_cost(none)


def test_a_model_given_to_a_method_strategy_is_not_reused_silently():
    """The strategy converts the model object in place: a strategy built afterwards on
    the same object gets an explanation, not a head-less network."""
    bench = split_digits()
    model = mlp()
    _strategy("rkr", model)
    naive = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                  train_mb_size=16, evaluator=_evaluator())
    with pytest.raises(RuntimeError, match="converted in place"):
        naive.train(bench.train_stream[0])
    with pytest.raises(ValueError, match="already converted"):
        _strategy("piggyback", model)


@pytest.mark.parametrize("method,options,error", [
    ("rkr", {"rank": 0}, ValueError),
    ("mask-rkr", {"rank": 1.5}, ValueError),
    ("piggyback", {"mask_threshold": -1.0}, ValueError),
    ("mask-rkr", {"mask_placement": "diagonal"}, ValueError),
    ("rkr", {"bn_policy": "drift"}, ValueError),
    ("rkr", {"mask_init": 0.1}, TypeError),  # not an RKR option
])
def test_invalid_options_fail_at_construction(method, options, error):
    with pytest.raises(error):
        _strategy(method, mlp(), **options)


def test_per_task_batchnorm_trains_its_own_copy_and_keeps_the_base():
    bench = split_digits(**DIGITS_KW["resnet"])
    strategy = _strategy("rkr", BACKBONES["resnet"](), bn_policy="per_task")
    base_bn = strategy.model.backbone.bn1.base
    running = base_bn.running_mean.clone()
    strategy.train(bench.train_stream[0])
    copy = strategy.model.backbone.bn1.tasks["0"]
    assert torch.equal(base_bn.running_mean, running)
    assert not torch.equal(copy.running_mean, running)
    cost = strategy.model.backbone.bn1.task_cost(0)
    assert cost.real == 4 * base_bn.num_features  # affine + running statistics
