"""Tests for minigpt.raylib: what the driver prints of its workers' output (each progress line once, no chatter)."""

import sys
import time

import pytest

from minigpt.raylib import progress_lines


def test_progress_lines_keep_stage_tags_only():
    lines = ["[recover] legal step 3/16 loss 2.1", "Loading weights: 100%|██████████| 20/20",
             "[2026-11-29 09:32:17,774] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator",
             "[rank0]: Traceback", "[evaluate] dense on legal: ppl 25.8", "Requesting resources: {'CPU': 0.5} * 1",
             "  [recover] indented is not a progress line", "[search_x] alpha front"]
    assert progress_lines(lines) == ["[recover] legal step 3/16 loss 2.1", "[evaluate] dense on legal: ppl 25.8",
                                     "[search_x] alpha front"]


@pytest.mark.ray
def test_driver_prints_each_worker_progress_line_once(capfd):
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from minigpt.raylib import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    ensure_ray(num_cpus=2)
    try:
        @ray.remote(num_cpus=0.5)
        def task():
            print("[evaluate] from a task", flush=True)
            print("Loading weights: 100%| from a task", flush=True)
            print("[evaluate] to stderr", file=sys.stderr, flush=True)

        def train_loop(config):  # defined here so that it is pickled by value (workers cannot import tests)
            print("[recover] from the training worker", flush=True)
            print("chatter from the training worker", flush=True)

        ray.get(task.remote())
        TorchTrainer(train_loop, scaling_config=ScalingConfig(num_workers=1, use_gpu=False,
                                                               resources_per_worker={"CPU": 0.5})).fit()
        time.sleep(3)  # worker output reaches the driver asynchronously
        out, err = capfd.readouterr()
    finally:
        ray.shutdown()
    text = out + err
    assert text.count("[recover] from the training worker") == 1, text  # Ray Train's print patch doubled it
    assert text.count("[evaluate] from a task") == 1 and text.count("[evaluate] to stderr") == 1
    assert "chatter" not in text and "Loading weights" not in text
    assert "Requesting resources" not in text  # Ray Train's controller chatter stays in its worker log
    assert "pid=" not in text  # progress lines are printed without Ray's "(task pid=…)" prefix
