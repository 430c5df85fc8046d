"""Task-free inference of RKR, Piggyback and Mask-RKR on class-incremental streams."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from test_cil import MLP, digits_stream, tensors
from torch import nn

import avalanche_maskrkr as amr
from avalanche_maskrkr import convert
from avalanche_maskrkr.accounting import method_cost
from avalanche_maskrkr.evaluation import TaskIdentificationAccuracy
from avalanche_maskrkr.options import make_options
from avalanche_maskrkr.routing import choose_tasks, energy, entropy, task_logits

METHODS = {"rkr": amr.RKR, "piggyback": amr.Piggyback, "mask-rkr": amr.MaskRKR}


pytestmark = pytest.mark.filterwarnings("ignore:The base network is frozen from the start")


def perturbed_tasks(network, n_tasks: int = 3, n_classes: int = 3, scale: float = 0.05):
    """``n_tasks`` finished tasks with parameters moved by ``scale`` * N(0, 1) noise
    (mask scores included)."""
    for task in range(n_tasks):
        network.add_task(task, n_classes)
        with torch.no_grad():
            for param in network.parameter_roles([task])["factors"] + network.parameter_roles(
                    [task])["masks"] + network.parameter_roles([task])["head"]:
                param.add_(scale * torch.randn_like(param))
        network.finish_task(task)
    return network.eval()


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("bn_policy", ["frozen", "per_task"])
def test_several_tasks_in_one_call_equal_one_call_per_task(method, bn_policy):
    torch.manual_seed(0)
    network = perturbed_tasks(convert(timm.create_model("test_resnet", num_classes=3),
                                      make_options(method, bn_policy=bn_policy)))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        single = [network.forward_single_task(x, task) for task in range(3)]
        batched = network.forward_tasks(x, [0, 1, 2])
        assert not torch.allclose(single[0], single[1])  # the tasks differ
        for one, many in zip(single, batched):
            torch.testing.assert_close(many, one)
        if bn_policy == "frozen":  # the superposition with weight 1 on one task is that task
            for task in range(3):
                one_hot = F.one_hot(torch.tensor(task), 3).float()
                torch.testing.assert_close(network.forward_tasks(x, [0, 1, 2], one_hot),
                                           single[task])


class TwoBlocks(nn.Module):
    """Features = W x (W starts as the identity) on 2 blocks of 4 inputs; classifier fc."""

    def __init__(self):
        super().__init__()
        self.features = nn.Linear(8, 8, bias=False)
        self.fc = nn.Linear(8, 2)
        nn.init.eye_(self.features.weight)

    def forward(self, x):
        return self.fc(self.features(x))


def test_supsup_chooses_the_task_whose_mask_and_head_read_the_input():
    """Task t's mask keeps only the weights of block t and its head reads block t: on an
    input living in block i, raising alpha_i sharpens the output (entropy falls), raising
    any other alpha changes nothing, so SupSup's one-shot choice is task i."""
    network = convert(TwoBlocks(), make_options("piggyback", task_inference="supsup"))
    layer = network.backbone.features
    for task in range(2):
        network.add_task(task, 2)
        block = torch.zeros(8, 8, dtype=torch.bool)
        block[4 * task:4 * task + 4, 4 * task:4 * task + 4] = True
        with torch.no_grad():
            layer.tasks[str(task)].mask.scores.copy_(torch.where(block, 1.0, -1.0))
            head = network.heads[str(task)]
            head.weight.zero_()
            head.weight[0, 4 * task:4 * task + 4] = 1.0
            head.bias.zero_()
        network.finish_task(task)
    network.eval()
    for task in range(2):
        x = torch.zeros(5, 8)
        x[:, 4 * task:4 * task + 4] = torch.rand(5, 4) + 1
        assert choose_tasks(network, x).tolist() == [task] * 5


@pytest.mark.parametrize("kind, score", [("entropy", entropy), ("energy", energy)])
def test_confidence_router_takes_the_least_uncertain_task(kind, score):
    torch.manual_seed(0)
    network = perturbed_tasks(convert(MLP(), make_options("rkr", task_inference=kind)),
                              scale=1.0)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        by_hand = torch.stack([score(network.forward_single_task(x, t)) for t in range(3)])
        chosen = choose_tasks(network, x)
    assert chosen.tolist() == by_hand.argmin(0).tolist()
    assert len(set(chosen.tolist())) > 1  # per input, not per batch


def train_class_incremental(method: str, kind: str, experiences: int = 3, **options):
    torch.manual_seed(0)
    stream = digits_stream()
    model = MLP()
    strategy = METHODS[method](
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), train_epochs=1,
        train_mb_size=32, eval_mb_size=128, task_inference=kind, **options,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                   TaskIdentificationAccuracy(), loggers=[]))
    for experience in stream.train_stream[:experiences]:
        strategy.train(experience)
    strategy.model.eval()
    return strategy, stream


def test_each_experience_becomes_a_task_over_its_global_classes():
    strategy, stream = train_class_incremental("piggyback", "prototype")
    network = strategy.model
    assert network.trained_tasks == [0, 1, 2]
    assert network.task_class_ids == {0: [0, 1], 1: [2, 3], 2: [4, 5]}
    assert network.class_task.tolist() == [0, 0, 1, 1, 2, 2]
    x, y = tensors(stream.test_stream[:3])
    with torch.no_grad():
        logits = network(x, torch.zeros(len(x), dtype=torch.long))
    assert logits.shape == (len(x), 6)
    chosen = network.routed_tasks
    for task, classes in network.task_class_ids.items():  # each row: its task's columns
        rows = chosen == task
        others = [c for c in range(6) if c not in classes]
        assert (logits[rows][:, others] == torch.finfo(logits.dtype).min).all()
        with torch.no_grad():
            own = network.forward_single_task(x[rows], task)
        torch.testing.assert_close(logits[rows][:, classes], own)


def test_always_right_router_gives_task_incremental_accuracy():
    """Routed to the task that learned its class, an input's class-incremental prediction
    is its task-incremental prediction, so the accuracies are equal."""
    strategy, stream = train_class_incremental("mask-rkr", "energy")
    network = strategy.model
    for experience in stream.test_stream[:3]:
        x, y = tensors([experience])
        true_tasks = network.class_task[y]
        task = int(true_tasks[0])
        with torch.no_grad():
            class_il = network.routed_logits(x, true_tasks).argmax(1)
            local = network.forward_single_task(x, task).argmax(1)
        task_il = torch.tensor(network.task_class_ids[task])[local]
        assert torch.equal(class_il, task_il)
        local_labels = y - min(network.task_class_ids[task])
        assert (class_il == y).float().mean() == (local == local_labels).float().mean()


def test_prototype_router_uses_base_class_means():
    strategy, stream = train_class_incremental("rkr", "prototype")
    network = strategy.model
    x, y = tensors(stream.train_stream[:3])
    with torch.no_grad():
        base = network.base_features(x)
        means = torch.stack([base[y == c].mean(0) for c in range(6)])
        torch.testing.assert_close(network.base_classifier.means, means)
        xt, _ = tensors(stream.test_stream[:3])
        nearest = (F.normalize(network.base_features(xt), dim=1)
                   @ F.normalize(means, dim=1).T).argmax(1)
        assert choose_tasks(network, xt).tolist() == network.class_task[nearest].tolist()
    # the class means the router stores count in the network's cost
    with_means = method_cost(network)["total_params"]
    network.base_classifier.means = network.base_classifier.means[:0]
    assert with_means - method_cost(network)["total_params"] == 6 * 16


def test_ranpac_router_is_ridge_regression_on_base_features():
    """The ranpac router's classifier is the ridge solution on the base features of all
    experiences seen (RanPAC's), and it routes to the task of the class it predicts."""
    strategy, stream = train_class_incremental("piggyback", "ranpac", ranpac_dim=64)
    network, ridge = strategy.model, strategy.model.base_classifier
    x, y = tensors(stream.train_stream[:3])
    with torch.no_grad():
        h = ridge.project(network.base_features(x)).double()
        joint = torch.linalg.solve(h.T @ h + ridge.ridge * torch.eye(64, dtype=torch.float64),
                                   h.T @ F.one_hot(y, 6).double())
        torch.testing.assert_close(ridge.weight, joint.float(), rtol=1e-4, atol=1e-5)
        xt, _ = tensors(stream.test_stream[:3])
        predicted = ridge(network.base_features(xt)).argmax(1)
        assert choose_tasks(network, xt).tolist() == network.class_task[predicted].tolist()


def test_task_identification_accuracy_is_logged_and_right():
    strategy, stream = train_class_incremental("rkr", "prototype")
    results = strategy.eval(stream.test_stream[:3])
    network = strategy.model
    for j, experience in enumerate(stream.test_stream[:3]):
        x, y = tensors([experience])
        with torch.no_grad():
            right = (choose_tasks(network, x) == network.class_task[y]).float().mean()
        name = f"TaskId_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"
        assert results[name] == pytest.approx(float(right))


def test_state_dict_restores_a_class_incremental_network():
    strategy, stream = train_class_incremental("piggyback", "prototype", experiences=2)
    fresh = convert(MLP(), make_options("piggyback", task_inference="prototype"))
    fresh.load_state_dict(strategy.model.state_dict())
    fresh.eval()
    x, _ = tensors(stream.test_stream[:2])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, 0), strategy.model(x, 0))
    assert fresh.task_class_ids == strategy.model.task_class_ids


def test_oracle_on_a_class_incremental_stream_names_task_inference():
    with pytest.raises(ValueError, match="task_inference"):
        train_class_incremental("rkr", "oracle", experiences=2)


def test_a_class_learned_before_is_refused_before_anything_changes():
    """Each class belongs to the task that learned it: an experience bringing a learned
    class again (as a stream numbering classes from 0 in each task does) is refused,
    the network unchanged."""
    strategy, stream = train_class_incremental("rkr", "prototype", experiences=1)
    network = strategy.model
    state = copy.deepcopy(network.state_dict())
    with pytest.raises(ValueError, match=r"classes \[0, 1\], which task 0 already learned"):
        strategy.train(stream.train_stream[0])
    assert network.adapted_tasks == [0] and network.task_class_ids == {0: [0, 1]}
    assert network.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in network.state_dict().items()
               if isinstance(v, torch.Tensor))


def test_supsup_needs_frozen_batchnorm_and_unknown_router_is_refused():
    with pytest.raises(ValueError, match="bn_policy='frozen'"):
        make_options("piggyback", task_inference="supsup", bn_policy="task_stats")
    with pytest.raises(ValueError, match="task_inference must be one of"):
        make_options("rkr", task_inference="guess")
    with pytest.raises(ValueError, match="ranpac_dim"):
        make_options("rkr", task_inference="ranpac", ranpac_dim=0)


def test_torchvision_attention_falls_back_to_one_call_per_task():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1,
                                                 num_heads=2, hidden_dim=16, mlp_dim=32,
                                                 num_classes=3)
    network = perturbed_tasks(convert(copy.deepcopy(model),
                                      make_options("rkr", task_inference="entropy")))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        by_hand = torch.stack([entropy(network.forward_single_task(x, t)) for t in range(3)])
        assert choose_tasks(network, x).tolist() == by_hand.argmin(0).tolist()


def test_out_of_memory_splits_the_tasks_in_halves(monkeypatch):
    """A call over more tasks than memory allows is split in halves, down to one call
    per task where needed; the logits are the same."""
    torch.manual_seed(0)
    network = perturbed_tasks(convert(MLP(), make_options("rkr", task_inference="energy")),
                              n_tasks=4, scale=1.0)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = [network.forward_single_task(x, t) for t in range(4)]
        calls = []
        fits = network.forward_tasks

        def small_memory(x, tasks, alphas=None):
            calls.append(list(tasks))
            if len(tasks) > 1:
                raise torch.OutOfMemoryError("too many tasks at once")
            return fits(x, tasks, alphas)

        monkeypatch.setattr(network, "forward_tasks", small_memory)
        for got, want in zip(task_logits(network, x, [0, 1, 2, 3]), expected):
            torch.testing.assert_close(got, want)
    assert calls == [[0, 1, 2, 3], [0, 1], [2, 3]]
