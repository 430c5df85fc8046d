"""The converted network as an Avalanche ``MultiTaskModule``: padded multi-task logits,
and a converted model that only runs inside its network."""
import copy

import pytest
import torch
from torch.nn import functional as F

import avalanche_maskrkr as amr
from avalanche_maskrkr.acceleration import autocast
from backbones import mlp

CLASSES = {0: 2, 1: 5}  # task 0 has fewer classes than task 1


def _network():
    """An RKR network with tasks of 2 and 5 classes, task 0's logits all negative."""
    torch.manual_seed(0)
    net = amr.convert(mlp(), "rkr")
    for task, n_classes in CLASSES.items():
        net.add_task(task, n_classes)
    net.max_class_label = max(CLASSES.values())  # what Avalanche's adaptation sets
    with torch.no_grad():
        net.heads["0"].weight.zero_()
        net.heads["0"].bias.copy_(torch.tensor([-3.0, -1.0]))
    return net


@pytest.mark.parametrize("labels", [[0] * 6, [0, 1, 0, 1, 1, 0]], ids=["one-task", "mixed"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_padding_never_wins_and_adds_nothing_to_the_loss(precision, labels):
    net = _network().train()
    labels = torch.tensor(labels)
    n_classes = torch.tensor([CLASSES[t] for t in labels.tolist()])
    x = torch.randn(len(labels), 1, 8, 8)
    targets = (torch.rand(len(labels)) * n_classes).long()
    with autocast("cpu", precision):  # forward and loss, as AccelerationPlugin runs them
        logits = net(x, labels)
        loss = F.cross_entropy(logits, targets)
        # the loss of each row over its own task's columns only
        own = sum(F.cross_entropy(logits[i:i + 1, :n], targets[i:i + 1])
                  for i, n in enumerate(n_classes.tolist())) / len(labels)
    expected_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert logits.shape == (len(labels), 5) and logits.dtype == expected_dtype[precision]
    assert (logits.argmax(1) < n_classes).all()
    assert (logits[labels == 0].argmax(1) == 1).all()  # -1 beats -3, and beats the padding
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, own)
    grad, = torch.autograd.grad(loss, logits, retain_graph=True)
    grad_own, = torch.autograd.grad(own, logits)
    padded = torch.arange(5) >= n_classes[:, None]
    assert padded.any() and torch.equal(grad[padded], torch.zeros_like(grad[padded]))
    torch.testing.assert_close(grad, grad_own)


def test_a_converted_model_runs_only_inside_its_network():
    """Conversion is in place; the original model object, now the network's backbone,
    refuses a call from outside the network and a second conversion."""
    net = _network()
    model = net.backbone
    x, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 1])
    with pytest.raises(RuntimeError, match="converted in place"):
        model(x)
    with pytest.raises(ValueError, match="already converted"):
        amr.convert(model, "piggyback")
    net.eval()
    with torch.no_grad():
        out = net(x, labels)
        # a copy of the network checks its own task context, not the original's
        torch.testing.assert_close(copy.deepcopy(net)(x, labels), out)
