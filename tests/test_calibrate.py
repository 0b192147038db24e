"""Calibration on Ray: N workers equal 1, a killed worker changes nothing, restarts skip finished shards."""

import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

import minigpt.raylib  # noqa: F401  (sets RAY_AUTH_MODE before ray starts)
from minigpt import calibrate as K, stats as S
from minigpt.calibrate import CalibrationError, Shard, calibrate, load_profile, merge_ledger, save_profile
from minigpt.config import CalibrateConfig, ModelConfig
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    model = make_tiny_llama()
    model.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    shards = []
    for domain in ("a", "b"):
        for i in range(5):
            blocks = rng.integers(0, 128, size=(3, 16), dtype=np.int32)
            path = root / "data" / domain / f"shard-{i:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"input_ids": list(blocks), "n_bytes": [16] * 3}), path)
            shards.append(Shard(f"{domain}/shard-{i:05d}", domain, str(path)))
    return root, model, shards


def _cfg(workers):
    return CalibrateConfig(workers=workers, cpus_per_worker=0.5, batch_size=2)


def _direct(model, shards, domain, spec=S.StatSpec()):
    import pyarrow.parquet as pq

    parts = []
    for s in sorted((s for s in shards if s.domain == domain), key=lambda s: s.shard_id):
        ids = torch.tensor(pq.read_table(s.path).column("input_ids").to_pylist())
        parts.append(S.accumulate(model, ids, batch_size=2, spec=spec))
    return S.merge(parts)


def _assert_equal(a, b):
    for d in a:
        for k in a[d]:
            torch.testing.assert_close(a[d][k], b[d][k], rtol=1e-9, atol=1e-12)


def test_two_workers_equal_one_worker_and_a_direct_pass(ray_local, setup, tmp_path):
    root, model, shards = setup
    mcfg = ModelConfig(source=str(root / "model"))
    one = calibrate(shards, mcfg, _cfg(1), tmp_path / "l1")
    two = calibrate(shards, mcfg, _cfg(2), tmp_path / "l2")
    _assert_equal(one, two)
    for d in ("a", "b"):
        direct = _direct(model, shards, d)
        for k in direct:
            torch.testing.assert_close(two[d][k], direct[k], rtol=1e-9, atol=1e-12)
    assert one["a"]["tokens"].item() == 5 * 3 * 16


def test_gram_statistics_merge_exactly_across_workers_with_grouped_flushes(ray_local, setup, tmp_path, capsys,
                                                                          monkeypatch):
    """Second moments are summed per run of shards before they reach the ledger (a record per shard would be
    huge); 2 workers still give the 1-worker and the direct profile, and a worker that dies before its flush
    loses nothing."""
    root, model, shards = setup
    mcfg = ModelConfig(source=str(root / "model"))
    spec = S.StatSpec(gram=True, depth_spans=(1,))
    one = calibrate(shards, mcfg, _cfg(1), tmp_path / "g1", spec=spec)
    monkeypatch.setattr(K, "Coordinator", _killing_coordinator())
    two = calibrate(shards, mcfg, _cfg(2), tmp_path / "g2", spec=spec)
    # A worker died holding shards it had not flushed (their sums were lost with it) and they were redone.
    assert re.search(r"worker w\d+ died; re-queued [1-9]\d* shard", capsys.readouterr().out)
    assert len(list((tmp_path / "g1").rglob("*.safetensors"))) == 2  # one flush per domain with one worker
    for d in ("a", "b"):
        direct = _direct(model, shards, d, spec)
        assert "mlp_gram" in two[d] and "depth_cross_1" in two[d]
        for k in direct:
            torch.testing.assert_close(one[d][k], direct[k], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(two[d][k], direct[k], rtol=1e-9, atol=1e-9)


def test_streamed_and_whole_model_workers_equal_the_direct_pass(ray_local, setup, tmp_path):
    """Workers holding one decoder layer at a time (calibrate.streamed true, or "auto" with a worker memory limit;
    here with the stream spilled to disk) and workers holding the whole model give the in-memory profile, Gram
    statistics included; depth-span moments fall back to the whole model and are equal too."""
    import dataclasses

    root, model, shards = setup
    mcfg = ModelConfig(source=str(root / "model"))
    assert not _cfg(2).streams and dataclasses.replace(_cfg(2), worker_memory_gb=1.0).streams
    for k, (spec, streamed) in enumerate(((S.StatSpec(gram=True), True), (S.StatSpec(gram=True), False),
                                          (S.StatSpec(depth_spans=(1,)), True))):
        cfg = dataclasses.replace(_cfg(2), streamed=streamed, stream_memory_gb=0)
        got = calibrate(shards, mcfg, cfg, tmp_path / f"s{k}", spec=spec)
        for d in ("a", "b"):
            direct = _direct(model, shards, d, spec)
            for k in direct:
                torch.testing.assert_close(got[d][k], direct[k], rtol=1e-9, atol=1e-9)


def _killing_coordinator(nth: int = 3):
    """The coordinator, except that it kills the worker it hands its `nth` shard to, once, as it hands it over: that
    worker dies holding every shard it has not recorded (with grouped flushes, more than one). Defined in a function
    so that Ray ships the class by value (the test module is not importable on Ray's workers)."""
    driver = os.getpid()  # calibration worker actors are named after the driver's pid

    class KillingCoordinator(K.Coordinator.__ray_actor_class__):
        def next_shard(self, worker_id: str):
            item = super().next_shard(worker_id)
            self.handed = getattr(self, "handed", 0) + 1
            if item is not None and self.handed == nth:
                ray.kill(ray.get_actor(f"minigpt-calib-{worker_id}-{driver}"))
            return item

    return ray.remote(num_cpus=0)(KillingCoordinator)


def test_killed_worker_gives_the_fault_free_profile(ray_local, setup, tmp_path, capsys, monkeypatch):
    root, _, shards = setup
    mcfg = ModelConfig(source=str(root / "model"))
    clean = calibrate(shards, mcfg, _cfg(2), tmp_path / "clean")
    monkeypatch.setattr(K, "Coordinator", _killing_coordinator())
    faulty = calibrate(shards, mcfg, _cfg(2), tmp_path / "faulty")
    assert re.search(r"worker w\d+ died; re-queued [1-9]\d* shard", capsys.readouterr().out)  # holding shards
    _assert_equal(clean, faulty)


def test_a_dead_workers_shards_go_back_to_the_queue_and_are_recorded_once(ray_local, setup, tmp_path):
    """The coordinator's side of a death, step by step: the shard a dead worker held is handed out again, and a
    late duplicate submission of a recorded shard is ignored."""
    from minigpt.calibrate import Coordinator

    _, _, shards = setup
    two = list(shards[:2])
    refs = {s.shard_id: ray.put(np.zeros((1, 4), dtype=np.int64)) for s in two}
    coord = Coordinator.remote(two, refs, str(tmp_path / "ledger"), [])
    first = ray.get(coord.next_shard.remote("w0"))[0]
    assert ray.get(coord.progress.remote())["in_flight"] == {first: "w0"}
    assert ray.get(coord.worker_failed.remote("w0")) == [first]
    assert ray.get(coord.next_shard.remote("w1"))[0] == first  # the lost shard first, to another worker
    arrays = {"tokens": np.array([4.0])}
    assert ray.get(coord.submit.remote("w1", [first], arrays)) is True
    assert ray.get(coord.submit.remote("w0", [first], arrays)) is False  # recorded once
    assert ray.get(coord.progress.remote())["done"] == 1


def test_restart_processes_only_unfinished_shards(ray_local, setup, tmp_path):
    root, _, shards = setup
    mcfg = ModelConfig(source=str(root / "model"))
    ledger = tmp_path / "ledger"
    first = calibrate(shards, mcfg, _cfg(2), ledger)
    files = sorted(ledger.rglob("*.safetensors"))
    assert len(files) == len(shards)
    for f in files[:3]:
        f.unlink()
    before = {f: os.stat(f).st_mtime_ns for f in files[3:]}
    second = calibrate(shards, mcfg, _cfg(2), ledger)
    assert all(os.stat(f).st_mtime_ns == t for f, t in before.items())  # finished shards not redone
    assert all(f.is_file() for f in files[:3])
    _assert_equal(first, second)


def test_unreadable_shard_names_its_path_and_keeps_finished_work(ray_local, setup, tmp_path):
    root, _, shards = setup
    mcfg = ModelConfig(source=str(root / "model"))
    ledger = tmp_path / "ledger"
    calibrate(shards[:2], mcfg, _cfg(1), ledger)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(CalibrationError, match="bad.parquet"):
        calibrate(shards[:2] + [Shard("a/bad", "a", str(bad))], mcfg, _cfg(1), ledger)
    assert len(list(ledger.rglob("*.safetensors"))) == 2


def test_profile_round_trip(tmp_path, setup):
    _, model, shards = setup
    st = _direct(model, shards, "a")
    save_profile(tmp_path / "a.safetensors", st, {"model": "tiny", "shards": 5})
    back, header = load_profile(tmp_path / "a.safetensors")
    assert header["tokens"] == 240 and header["model"] == "tiny" and "mlp_abs_sum" in header["statistics"]
    assert all(torch.equal(back[k], st[k]) for k in st)
    assert (tmp_path / "a.json").is_file()


def test_merge_ledger_reports_missing(tmp_path):
    with pytest.raises(CalibrationError, match="missing"):
        merge_ledger(tmp_path, [Shard("a/x", "a", "x")])


@pytest.mark.parametrize("target", ["layer", "stream"])
def test_sequential_on_ray_actors_equals_one_in_process_runner(ray_local, setup, target):
    """The sequential protocol over 2 Ray actors, each holding the activations of half the calibration blocks
    (and, for the stream refit, the dense model's stream beside them), gives the plan and weights of one
    in-process runner over all of them (per-layer sums merge exactly)."""
    import ray

    from minigpt import sequential as Q
    from minigpt.config import PruneConfig

    root, model, _ = setup
    blocks = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(4))
    cfg = PruneConfig(method="obs", target=0.3, kv_groups=1, multiple_of=4, sequential=True, refit_target=target)
    local, w_local = Q.prune_sequential(model, [Q.LayerRunner(model, blocks, 2)], cfg, domain="d")
    runners = Q.ray_runners(str(root / "model"), [blocks[:4], blocks[4:]], 2, cpus_per_worker=0.5)
    try:
        remote, w_remote = Q.prune_sequential(model, runners, cfg, domain="d", remote=True)
    finally:
        for r in runners:
            ray.kill(r)
    assert remote.layers == local.layers and set(w_remote) == set(w_local)
    for k in w_local:
        torch.testing.assert_close(w_remote[k], w_local[k], rtol=1e-6, atol=1e-6)
