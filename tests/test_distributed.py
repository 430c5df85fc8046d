"""Two CPU processes (torchrun, gloo) train Mask-RKR like one process on the global batch,
and each evaluates the whole test stream like that process.

Why this is the right equality: with ``shuffle=False`` the distributed sampler gives rank r
the samples r, r + 2, r + 4, ... so that step i of the two ranks covers exactly the 2B
samples of step i of one process with batch 2B. DDP averages the two ranks' mean-loss
gradients, which is the gradient of the mean loss over the 2B samples; with plain SGD the
parameters then agree with the single-process run up to float summation order. Both
ranks apply the same averaged gradient to the same broadcast initialisation, so their
parameters agree bit for bit. The first experience trains real factors, the second masks
over them (straight-through gradients), so both kinds of task parameters are covered.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from avalanche_maskrkr.benchmarks import split_digits
from avalanche_maskrkr.distributed import evaluate_digits, train_digits
from avalanche_maskrkr.export import export_task

BATCH = 8  # per process


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory):
    """OUT of a two-process run: OUT/rank<r>/ holds the task exports and eval.json."""
    out = tmp_path_factory.mktemp("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", "-m", "avalanche_maskrkr.distributed", "--method", "mask-rkr",
         "--experiences", "2", "--batch", str(BATCH), "--no-shuffle", "--backend", "gloo",
         "--out", str(out), "--eval"],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def single():
    """The same training in one process, on the global batch."""
    return train_digits("mask-rkr", experiences=2, batch=2 * BATCH, shuffle=False,
                        device=torch.device("cpu"))


def test_two_processes_match_one_process_on_the_global_batch(ranks_out, tmp_path, single):
    for task in (0, 1):
        export_task(single.model, task, tmp_path / f"single{task}.safetensors")
        ranks = [load_file(ranks_out / f"rank{r}" / f"task{task}.safetensors") for r in (0, 1)]
        reference = load_file(tmp_path / f"single{task}.safetensors")
        assert ranks[0].keys() == reference.keys()
        for key in reference:
            assert torch.equal(ranks[0][key], ranks[1][key])
            if key == "bits":
                assert torch.equal(ranks[0][key], reference[key])
            else:
                torch.testing.assert_close(ranks[0][key], reference[key], rtol=1e-4, atol=1e-6)
    # the comparison is not vacuous: training moved the parameters and the masks
    real = load_file(tmp_path / "single0.safetensors")["real.float32"]
    untrained = train_digits("mask-rkr", experiences=2, batch=2 * BATCH, lr=0.0,
                             shuffle=False, device=torch.device("cpu")).model
    export_task(untrained, 0, tmp_path / "untrained0.safetensors")
    export_task(untrained, 1, tmp_path / "untrained1.safetensors")
    assert not torch.allclose(real, load_file(tmp_path / "untrained0.safetensors")["real.float32"])
    assert not torch.equal(load_file(tmp_path / "single1.safetensors")["bits"],
                           load_file(tmp_path / "untrained1.safetensors")["bits"])


def test_every_process_evaluates_the_whole_test_stream(ranks_out, single):
    ranks = [json.loads((ranks_out / f"rank{r}" / "eval.json").read_text()) for r in (0, 1)]
    reference = evaluate_digits(single, experiences=2)
    test_stream = split_digits(n_experiences=5, image_size=16, channels=3).test_stream
    assert reference["samples"] == sum(len(exp.dataset) for exp in test_stream[:2])
    assert len(reference["accuracy"]) == 2  # one accuracy per experience
    for result in ranks:
        assert result["samples"] == reference["samples"]  # not a shard: all of it
        assert result["accuracy"] == pytest.approx(reference["accuracy"])
