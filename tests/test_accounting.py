"""Parameter accounting (SPEC section 4) against hand counts, and the params CLI."""
import pytest
import torch
from torch import nn

import avalanche_maskrkr as amr
from avalanche_maskrkr.cli import main


class Net(nn.Module):
    """Stem conv 3->4 (3x3, no bias), linear 16->6, classifier 6->C."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(16, 6)
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        return self.head(self.fc1(self.pool(self.conv(x)).flatten(1)))


T, C, K = 4, 5, 2
BASE = 3 * 4 * 9 + 16 * 6 + 6
HEAD = 6 * C + C
RKR_TASK = K * 3 * (3 + 4) + 4 + K * (16 + 6) + 6  # K k (in+out) + out per conv; K (in+out) + out
WEIGHTS = 3 * 4 * 9 + 16 * 6  # adapted weights (biases are never masked)
FACTORS = RKR_TASK  # Mask-RKR masks every LM, RM and F entry


@pytest.fixture(scope="module")
def report():
    return amr.parameter_report(Net, tasks=T, classes_per_task=C, rank=K).set_index("method")


def test_totals_follow_the_papers_conventions(report):
    single = BASE + HEAD
    expected = {
        "single": T * single,
        "multi-head": BASE + T * HEAD,
        "rkr": BASE + T * HEAD + T * RKR_TASK,
        "piggyback": BASE + T * HEAD + T * WEIGHTS / 32,
        "mask-rkr": BASE + T * HEAD + RKR_TASK + (T - 1) * FACTORS / 32,
    }
    for method, total in expected.items():
        assert report.loc[method, "total_params"] == round(total), method
        assert report.loc[method, "overhead_pct"] == pytest.approx(
            100 * (total - single) / single, abs=1e-3)
    assert report.loc["single", "overhead_pct"] == 100 * (T - 1)


def test_bytes_per_task_are_the_real_storage(report):
    head_bytes = HEAD * 4
    assert report.loc["rkr", "bytes_per_task"] == RKR_TASK * 4 + head_bytes
    assert report.loc["piggyback", "bytes_per_task"] == (
        -(-(3 * 4 * 9) // 8) - (-(16 * 6) // 8) + head_bytes)


def test_k_plus_is_the_largest_rank_within_rkr_total(report):
    k_plus = report.loc["mask-rkr-k+", "rank"]
    rkr_total = report.loc["rkr", "total_params"]
    assert report.loc["mask-rkr-k+", "total_params"] <= rkr_total
    over = amr.parameter_report(Net, tasks=T, classes_per_task=C, rank=int(k_plus) + 1)
    assert over.set_index("method").loc["mask-rkr", "total_params"] > rkr_total
    assert amr.find_k_plus(Net, tasks=T, rank=K, classes_per_task=C) == k_plus


def test_params_cli_prints_the_csv_contract(capsys):
    main(["params", "--model", "resnet18_cifar", "--img-size", "32", "--tasks", "10",
          "--classes-per-task", "10", "--rank", "2", "--format", "csv"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "method,rank,total_params,overhead_pct"
    assert [line.split(",")[0] for line in lines[1:]] == [
        "single", "multi-head", "rkr", "piggyback", "mask-rkr", "mask-rkr-k+"]
    single = lines[1].split(",")
    assert single[3] == "900.0"


def test_resnet18_cifar_has_the_cifar_stem():
    model = amr.accounting.create_backbone("resnet18_cifar", 10, img_size=32)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
