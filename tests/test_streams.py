"""Task-labelled streams, built from miniature datasets in the real on-disk formats."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from avalanche_maskrkr.benchmarks import (
    backbone_transforms,
    decathlon_score,
    split_cifar100,
    split_digits,
    split_imagenet,
    visual_decathlon,
)
from avalanche_maskrkr.benchmarks.decathlon import DOMAIN_MEAN_STD
from miniatures import class_colour, write_cifar100, write_decathlon, write_imagenet

TO_TENSOR = T.ToTensor()


def check_task_stream(stream, n_experiences: int, n_classes: int) -> None:
    """Experience i: task label i, classes 0..C-1, samples (x, y, i)."""
    assert len(stream) == n_experiences
    for i, exp in enumerate(stream):
        assert exp.task_labels == [i]
        assert sorted(exp.classes_in_this_experience) == list(range(n_classes))
        x, y, t = exp.dataset[0]
        assert isinstance(x, torch.Tensor) and t == i and 0 <= y < n_classes


def nearest_class(x: torch.Tensor, n_classes: int) -> int:
    """Class whose colour is closest to the mean colour of image x (3, H, W) in [0, 1]."""
    rgb = x.mean(dim=(1, 2)) * 255
    dist = [float((rgb - torch.tensor(class_colour(c))).abs().max()) for c in range(n_classes)]
    assert min(dist) < 8, "colour too far from every class colour"
    return int(np.argmin(dist))


# ---------------------------------------------------------------- CIFAR-100


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root, train_per_class=2, test_per_class=1)
    return root


def test_split_cifar100_reads_the_pickle_format(cifar_root):
    bench = split_cifar100(root=cifar_root, n_experiences=10)
    check_task_stream(bench.train_stream, 10, 10)
    check_task_stream(bench.test_stream, 10, 10)
    assert [len(e.dataset) for e in bench.train_stream] == [20] * 10
    assert [len(e.dataset) for e in bench.test_stream] == [10] * 10
    x, _, _ = bench.train_stream[3].dataset[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_split_cifar100_labels_follow_the_class_order(cifar_root):
    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)
    bench = split_cifar100(root=cifar_root, seed=3, eval_transform=TO_TENSOR)
    assert torch.equal(torch.rand(1), expected_draw), "global RNG must not be reseeded"
    order = bench.classes_order_original_ids
    assert sorted(order) == list(range(100)) and order != list(range(100))
    assert split_cifar100(root=cifar_root, seed=3).classes_order_original_ids == order
    assert split_cifar100(root=cifar_root, seed=4).classes_order_original_ids != order
    for stream in (bench.test_stream, bench.train_stream):
        for i, exp in enumerate(stream):
            task_classes = order[10 * i : 10 * (i + 1)]
            for x, y, t in exp.dataset.eval():
                original = round(float(x[0, 0, 0]) * 255)  # pixel value = class id
                assert (t, y) == (i, task_classes.index(original))


def test_split_cifar100_fixed_order_and_resize(cifar_root):
    bench = split_cifar100(
        root=cifar_root, n_experiences=5, image_size=64, fixed_class_order=range(100)
    )
    check_task_stream(bench.train_stream, 5, 20)
    exp = bench.test_stream[2]
    x, y, t = exp.dataset[0]
    assert x.shape == (3, 64, 64)
    assert bench.train_stream[2].dataset[0][0].shape == (3, 64, 64)
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    original = 40 + y  # task 2 holds classes 40..59
    assert x[:, 5, 5].tolist() == pytest.approx(
        [(original / 255 - m) / s for m, s in zip(mean, std)], abs=1e-4
    )


def test_split_cifar100_backbone_sets_size_and_normalisation(cifar_root):
    bench = split_cifar100(root=cifar_root, backbone="test_vit")  # 160 px, mean/std 0.5
    x, y, _ = bench.test_stream[0].dataset[0]
    original = bench.classes_order_original_ids[y]
    assert x.shape == (3, 160, 160)
    assert float(x[0, 80, 80]) == pytest.approx((original / 255 - 0.5) / 0.5, abs=1e-4)


def test_split_cifar100_missing_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        split_cifar100(root=tmp_path / "nowhere")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python" / "train") in message
    assert "Download the CIFAR-100 python version" in message


# ---------------------------------------------------------------- ImageNet


@pytest.fixture
def imagenet_root(tmp_path):
    write_imagenet(tmp_path, n_classes=10, train_per_class=2)
    return tmp_path


def test_split_imagenet_tasks_and_labels(imagenet_root):
    bench = split_imagenet(imagenet_root, n_experiences=5, eval_transform=TO_TENSOR)
    check_task_stream(bench.train_stream, 5, 2)
    check_task_stream(bench.test_stream, 5, 2)
    order = bench.classes_order_original_ids  # ImageFolder ids = sorted wnid positions
    for stream, per_class in ((bench.train_stream, 2), (bench.test_stream, 1)):
        for i, exp in enumerate(stream):
            samples = list(exp.dataset.eval())
            assert len(samples) == 2 * per_class
            for x, y, t in samples:
                assert (t, y) == (i, order[2 * i : 2 * i + 2].index(nearest_class(x, 10)))


def test_split_imagenet_default_transforms(imagenet_root):
    bench = split_imagenet(imagenet_root, n_experiences=5)
    assert bench.train_stream[0].dataset[0][0].shape == (3, 224, 224)
    assert bench.test_stream[4].dataset[0][0].shape == (3, 224, 224)
    small = split_imagenet(imagenet_root, n_experiences=2, image_size=48)
    check_task_stream(small.train_stream, 2, 5)
    assert small.train_stream[1].dataset[0][0].shape == (3, 48, 48)


def test_split_imagenet_checks_the_tree(imagenet_root):
    missing = sorted(p.name for p in (imagenet_root / "val").iterdir())[3]
    shutil.rmtree(imagenet_root / "val" / missing)
    with pytest.raises(ValueError, match=missing):
        split_imagenet(imagenet_root, n_experiences=5)
    shutil.rmtree(imagenet_root / "val")
    with pytest.raises(FileNotFoundError, match=str(imagenet_root / "val")):
        split_imagenet(imagenet_root, n_experiences=5)


# ---------------------------------------------------------------- Visual Decathlon

DOMAINS = {"dtd": 4, "gtsrb": 5, "svhn": 8}
COUNTS = {"train": [2, 1, 2], "val": [1, 0, 1], "test": [1, 1, 1]}  # val lacks class 1


@pytest.fixture
def decathlon(tmp_path):
    root = tmp_path / "decathlon-1.0"
    return root, write_decathlon(root, DOMAINS, COUNTS)


def expected_pixel(label: int, mean_std) -> list[float]:
    mean, std = mean_std
    return [(v / 255 - m) / s for v, m, s in zip(class_colour(label), mean, std)]


def test_visual_decathlon_one_task_per_domain(decathlon):
    root, expected = decathlon
    order = ("svhn", "dtd", "gtsrb")
    bench = visual_decathlon(root, domains=order)
    check_task_stream(bench.train_stream, 3, 3)
    for i, domain in enumerate(order):
        train, test = bench.train_stream[i], bench.test_stream[i]
        assert list(train.dataset.targets) == expected[domain, "train"]
        assert list(test.dataset.targets) == expected[domain, "val"]
        assert test.task_labels == [i] and sorted(test.classes_in_this_experience) == [0, 2]
        side = 72 if domain in ("svhn", "gtsrb") else 64  # reference: no crop for those
        for exp, split in ((train, "train"), (test, "val")):
            x, y, t = exp.dataset[0]
            assert x.shape == (3, side, side) and t == i
            assert y == expected[domain, split][0]
            assert x[:, side // 2, side // 2].tolist() == pytest.approx(
                expected_pixel(y, DOMAIN_MEAN_STD[domain]), abs=0.15
            )


def test_visual_decathlon_labelled_test_split_and_sizes(decathlon):
    root, expected = decathlon
    identity = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    bench = visual_decathlon(
        root, domains=("dtd", "gtsrb"), test_split="test", image_size=32, mean_std=identity
    )
    for i, domain in enumerate(("dtd", "gtsrb")):
        exp = bench.test_stream[i]
        assert list(exp.dataset.targets) == expected[domain, "test"]
        assert sorted(exp.classes_in_this_experience) == [0, 1, 2]
        for x, y, t in exp.dataset:
            assert x.shape == (3, 32, 32) and t == i
            assert x[:, 16, 16].tolist() == pytest.approx(expected_pixel(y, identity), abs=0.03)
        assert bench.train_stream[i].dataset[0][0].shape == (3, 32, 32)


def test_visual_decathlon_backbone(decathlon):
    root, _ = decathlon
    bench = visual_decathlon(root, domains=("svhn", "dtd"), backbone="test_vit")
    for stream in (bench.train_stream, bench.test_stream):
        for exp in stream:
            x, y, _ = exp.dataset[0]
            assert x.shape == (3, 160, 160)
            assert x[:, 80, 80].tolist() == pytest.approx(
                expected_pixel(y, ((0.5,) * 3, (0.5,) * 3)), abs=0.06
            )


def test_visual_decathlon_transform_groups(decathlon):
    root, _ = decathlon
    bench = visual_decathlon(
        root,
        domains=("dtd", "svhn"),
        train_transform=T.Compose([T.Resize((8, 8)), T.ToTensor()]),
        eval_transform=T.Compose([T.Resize((16, 16)), T.ToTensor()]),
    )
    for train, test in zip(bench.train_stream, bench.test_stream):
        assert train.dataset[0][0].shape == (3, 8, 8)
        assert test.dataset[0][0].shape == (3, 16, 16)  # test stream starts in eval mode
        assert train.dataset.eval()[0][0].shape == (3, 16, 16)
        assert test.dataset.train()[0][0].shape == (3, 8, 8)


def test_visual_decathlon_refuses_unlabelled_test(decathlon):
    root, _ = decathlon
    with pytest.raises(ValueError, match="test_stripped"):
        visual_decathlon(root, domains=("dtd",), test_split="test_stripped")
    annotations = root / "annotations"
    coco = json.loads((annotations / "dtd_test.json").read_text())
    del coco["annotations"][1:]
    (annotations / "dtd_test.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="2 of 3 images .* have no label"):
        visual_decathlon(root, domains=("dtd",), test_split="test")
    (annotations / "dtd_test.json").rename(annotations / "dtd_test_stripped.json")
    with pytest.raises(FileNotFoundError) as err:
        visual_decathlon(root, domains=("dtd",), test_split="test")
    assert str(annotations / "dtd_test.json") in str(err.value)
    assert "dtd_test_stripped.json has no labels" in str(err.value)


def test_visual_decathlon_missing_files_name_the_path(decathlon):
    root, _ = decathlon
    with pytest.raises(FileNotFoundError, match=str(root / "annotations" / "ucf101_train.json")):
        visual_decathlon(root, domains=("dtd", "ucf101"))
    shutil.rmtree(root / "data" / "gtsrb")
    with pytest.raises(FileNotFoundError, match=str(root / "data" / "gtsrb")):
        visual_decathlon(root, domains=("gtsrb",))


def test_decathlon_score_matches_hand_computation():
    # dtd at the baseline error: Emax = 2 * 0.4447, (0.4447 / 0.8894)^2 = 1/4 -> 250
    # gtsrb: Emax = 0.0494, error 0.01235 -> (0.03705 / 0.0494)^2 = 0.5625 -> 562.5
    # svhn error 0 -> 1000; ucf101: Emax = 0.976 < 0.99 -> 0
    errors = {"dtd": 0.4447, "gtsrb": 0.01235, "svhn": 0.0, "ucf101": 0.99}
    assert decathlon_score(errors) == pytest.approx(1812.5)
    assert decathlon_score({}) == 0.0
    with pytest.raises(ValueError, match="fraction"):
        decathlon_score({"dtd": 44.47})
    with pytest.raises(ValueError, match="unknown decathlon domain 'mnist'"):
        decathlon_score({"mnist": 0.1})


# ---------------------------------------------------------------- Digits


def test_split_digits_tasks_and_labels():
    from sklearn.datasets import load_digits

    bench = split_digits()
    check_task_stream(bench.train_stream, 5, 2)
    check_task_stream(bench.test_stream, 5, 2)
    digits = load_digits()
    label_of = {}
    for image, target in zip(digits.images, digits.target):
        label_of.setdefault(image.astype(np.float32).tobytes(), set()).add(int(target))
    sizes = {"train": 0, "test": 0}
    for name, stream in (("train", bench.train_stream), ("test", bench.test_stream)):
        for i, exp in enumerate(stream):
            for x, y, t in exp.dataset:
                assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and t == i
                assert label_of[(x[0].numpy() * 16).tobytes()] == {2 * i + y}
                sizes[name] += 1
    assert sizes == {"train": 1257, "test": 540}
    # prepared once, no per-sample transform: every training sample is a view of one
    # tensor holding all the training images
    storages = {x.untyped_storage().data_ptr() for exp in bench.train_stream
                for x, _, _ in exp.dataset}
    assert len(storages) == 1
    assert bench.train_stream[0].dataset[0][0].untyped_storage().nbytes() == 1257 * 64 * 4
    def first_test_images(b):
        return torch.stack([x for x, _, _ in b.test_stream[0].dataset])

    assert torch.equal(first_test_images(split_digits(seed=0)), first_test_images(bench))
    assert not torch.equal(first_test_images(split_digits(seed=1)), first_test_images(bench))


def test_split_digits_trains_a_multi_head_model():
    from avalanche.models import MultiHeadClassifier, MultiTaskModule
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.supervised import Naive

    class TinyMultiHead(MultiTaskModule):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
            self.heads = MultiHeadClassifier(32, 2)

        def forward(self, x, task_labels):
            return self.heads(self.features(x), task_labels)

    torch.manual_seed(0)
    bench = split_digits()
    model = TinyMultiHead()
    strategy = Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=32, train_epochs=3,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
    )
    for exp in bench.train_stream:
        strategy.train(exp)
    results = strategy.eval(bench.test_stream)
    accuracies = [v for k, v in results.items() if k.startswith("Top1_Acc_Exp/eval_phase")]
    assert len(accuracies) == 5 and min(accuracies) > 0.8
    assert [h.classifier.out_features for h in model.heads.classifiers.values()] == [2] * 5


def test_split_digits_resized_rgb():
    bench = split_digits(n_experiences=2, image_size=32, channels=3)
    check_task_stream(bench.train_stream, 2, 5)
    x, _, _ = bench.test_stream[1].dataset[0]
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[2])
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    with pytest.raises(ValueError, match="channels"):
        split_digits(channels=2)


# ---------------------------------------------------------------- backbone transforms


def steps(compose: T.Compose) -> list[str]:
    return [type(t).__name__ for t in compose.transforms]


def test_backbone_transforms_defaults_are_imagenet():
    train = backbone_transforms()
    assert steps(train) == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert train.transforms[0].size == (224, 224)
    assert train.transforms[-1].mean == (0.485, 0.456, 0.406)
    evaluation = backbone_transforms(train=False)
    assert steps(evaluation) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert evaluation.transforms[0].size == 256 and evaluation.transforms[1].size == (224, 224)


def test_backbone_transforms_from_timm_configs():
    vit = backbone_transforms("vit_base_patch16_224.augreg_in21k", train=False)
    resize, crop, _, norm = vit.transforms
    assert resize.size == round(224 / 0.9) and crop.size == (224, 224)
    assert resize.interpolation == InterpolationMode.BICUBIC
    assert norm.mean == (0.5, 0.5, 0.5) and norm.std == (0.5, 0.5, 0.5)
    wrapped = nn.Sequential(timm.create_model("test_vit", pretrained=False))
    assert backbone_transforms(wrapped).transforms[0].size == (160, 160)
    override = backbone_transforms("test_vit", image_size=96, train=False, mean_std=((0.1,) * 3, (0.2,) * 3))
    assert override.transforms[1].size == (96, 96) and override.transforms[-1].mean == (0.1,) * 3
    with pytest.raises(ValueError, match="no pretrained configuration"):
        backbone_transforms("not_a_model")
    with pytest.raises(ValueError, match="pretrained_cfg"):
        backbone_transforms(nn.Linear(2, 2))
