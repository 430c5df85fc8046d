"""Class-incremental methods on a frozen backbone: SimpleCIL and RanPAC."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from sklearn.datasets import load_digits
from torch import nn

from avalanche_maskrkr.baseline_accounting import baseline_cost
from avalanche_maskrkr.benchmarks import split_digits
from avalanche_maskrkr.cil import RanPAC, RanPACPlugin, SimpleCIL, SimpleCILPlugin
from avalanche_maskrkr.cil.ranpac import RanPACClassifier


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(self.features(x))


def digits_stream(n_experiences: int = 5):
    """Class-incremental split digits: classes in order 0..9, global ids, 8x8 images."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    test = torch.arange(len(labels)) % 4 == 0
    train_set, test_set = (_make_taskaware_tensor_classification_dataset(images[m], labels[m])
                           for m in (~test, test))
    return nc_benchmark(train_set, test_set, n_experiences, task_labels=False,
                        shuffle=False, fixed_class_order=list(range(10)))


def tensors(experiences):
    """All (x, y) of the experiences' datasets, concatenated."""
    xs, ys = zip(*[(x, y) for e in experiences for x, y, _ in e.dataset])
    return torch.stack(xs), torch.tensor(ys)


def evaluator():
    return EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])


def test_simplecil_prototypes_are_class_means_and_logits_cosine():
    torch.manual_seed(0)
    stream = digits_stream()
    reference = MLP()
    strategy = SimpleCIL(model=copy.deepcopy(reference), evaluator=evaluator())
    before = {k: v.clone() for k, v in strategy.model.state_dict().items() if "backbone" in k}
    widths = []
    for exp in stream.train_stream[:2]:
        strategy.train(exp)
        widths.append(strategy.model(torch.zeros(1, 1, 8, 8)).shape[1])
    assert widths == [2, 4]
    x, y = tensors(stream.train_stream[:2])
    features = reference.features(x).detach()
    means = torch.stack([features[y == c].mean(0) for c in range(4)])
    torch.testing.assert_close(strategy.model.means, means)
    cosine = F.normalize(features, dim=1) @ F.normalize(means, dim=1).T
    torch.testing.assert_close(strategy.model(x), cosine)
    after = {k: v for k, v in strategy.model.state_dict().items() if "backbone" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in strategy.model.parameters())
    assert not strategy.model.backbone.training


def test_ranpac_streamed_solution_equals_joint_ridge():
    torch.manual_seed(0)
    stream = digits_stream()
    grid = (1e-2, 1.0, 1e2)
    classifier = RanPACClassifier(MLP(), M=64, ridge_grid=grid)
    strategy = RanPAC(model=MLP(), M=64, ridge_grid=grid, evaluator=evaluator())
    strategy.model = classifier
    strategy.train(stream.train_stream[:3])
    assert classifier.ridge in grid
    x, y = tensors(stream.train_stream[:3])
    h = classifier.project(classifier.backbone(x)).double()
    targets = F.one_hot(y, 6).double()
    joint = torch.linalg.solve(h.T @ h + classifier.ridge * torch.eye(64, dtype=torch.float64),
                               h.T @ targets)
    torch.testing.assert_close(classifier.weight, joint.float(), rtol=1e-4, atol=1e-5)
    logits = classifier(x)
    assert logits.shape == (len(y), 6)
    torch.testing.assert_close(logits, (h @ joint).float(), rtol=1e-4, atol=1e-4)


def test_ranpac_rejects_a_bad_grid():
    with pytest.raises(ValueError, match="ridge_grid"):
        RanPACClassifier(MLP(), M=8, ridge_grid=(0.0, 1.0))


def test_strategies_against_nearest_class_mean_on_digits():
    """Final stream accuracy over 10 classes after 5 experiences, random test_resnet."""
    stream = digits_stream()
    results = {}
    for name, make in [("simplecil", lambda m: SimpleCIL(model=m, evaluator=evaluator(),
                                                         eval_mb_size=256)),
                       ("ranpac", lambda m: RanPAC(model=m, M=512, evaluator=evaluator(),
                                                   eval_mb_size=256))]:
        torch.manual_seed(0)
        strategy = make(timm.create_model("test_resnet", num_classes=2, in_chans=1))
        for exp in stream.train_stream:
            strategy.train(exp)
        metrics = strategy.eval(stream.test_stream)
        results[name] = metrics["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
        backbone = strategy.model.backbone
    x, y = tensors(stream.train_stream)
    x_test, y_test = tensors(stream.test_stream)
    with torch.no_grad():
        features, test_features = backbone(x), backbone(x_test)
    means = torch.stack([features[y == c].mean(0) for c in range(10)])
    euclidean = (torch.cdist(test_features, means).argmin(1) == y_test).sum().item() / len(y_test)
    cosine = ((F.normalize(test_features, dim=1) @ F.normalize(means, dim=1).T).argmax(1)
              == y_test).sum().item() / len(y_test)
    print(results, {"ncm_euclidean": euclidean, "ncm_cosine": cosine})
    assert results["simplecil"] == pytest.approx(cosine, abs=1e-9)
    assert results["simplecil"] > 0.3
    assert results["ranpac"] > max(euclidean, cosine) + 0.1


def test_class_ids_numbered_from_zero_in_each_task_are_refused():
    """One label space over every class: a task-incremental stream (classes 0 to 4 in
    each of its two tasks) is refused at its second experience, whatever the plugin; the same
    class with the same task label may come again."""
    task_stream = split_digits(n_experiences=2)
    for make in (lambda m: SimpleCIL(model=m, evaluator=evaluator()),
                 lambda m: RanPAC(model=m, M=32, evaluator=evaluator())):
        strategy = make(MLP())
        strategy.train(task_stream.train_stream[0])
        strategy.train(task_stream.train_stream[0])  # the same classes and task: accepted
        with pytest.raises(ValueError, match=r"Classes \[0, 1, 2, 3, 4\] arrive with task label\(s\) "
                                             r"\[1\] but came before with task label\(s\) \[0\]"):
            strategy.train(task_stream.train_stream[1])


def test_stored_class_statistics_are_counted():
    """SimpleCIL stores a mean per class; RanPAC its projection (D, M), Gram (M, M),
    targets (M, K) and solution (M, K); both beside the backbone's parameters."""
    stream = digits_stream()
    backbone = sum(p.numel() for p in MLP().features.parameters())  # the head is removed
    expected = {"simplecil": lambda k: backbone + k * 16,
                "ranpac": lambda k: backbone + 16 * 8 + 8 * 8 + 2 * 8 * k}
    for name, strategy in [("simplecil", SimpleCIL(model=MLP(), evaluator=evaluator())),
                           ("ranpac", RanPAC(model=MLP(), M=8, evaluator=evaluator()))]:
        for k, experience in zip((2, 4), stream.train_stream):
            strategy.train(experience)
            assert baseline_cost(strategy.model, [])["total_params"] == expected[name](k)


@pytest.mark.parametrize("plugin, strategy", [
    (lambda: SimpleCILPlugin(), lambda m: SimpleCIL(model=m, evaluator=evaluator())),
    (lambda: RanPACPlugin(M=32), lambda m: RanPAC(model=m, M=32, evaluator=evaluator()))])
def test_plugin_on_naive_is_the_strategy(plugin, strategy):
    """On Naive (whose epochs it skips), the plugin gives the strategy's classifier, and
    evaluating classes not learned yet is an inf loss, not an error."""
    stream = digits_stream()
    model = MLP()
    naive = Naive(model=copy.deepcopy(model), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                  train_epochs=3, plugins=[plugin()], evaluator=evaluator())
    reference = strategy(copy.deepcopy(model))
    for experience in stream.train_stream[:2]:
        naive.train(experience)
        reference.train(experience)
    assert naive.train_epochs == 3
    x, _ = tensors(stream.test_stream[:2])
    naive.model.eval()
    torch.testing.assert_close(naive.model(x), reference.model(x))
    results = naive.eval(stream.test_stream[:3])
    assert results["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp002"] == 0
