"""Job files: strict typed loading, key=value overrides, and every shipped YAML loads."""

from pathlib import Path

import pytest

from minigpt import config as C

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
    cfg = C.load(_write(tmp_path, MINIMAL))
    assert cfg.model.source == "smollm2-135m" and cfg.model.trust_remote_code is False
    assert cfg.domains[0].name == "legal" and cfg.domains[0].sources[0].kind == "licenses"
    assert cfg.prune.target == 0.25 and cfg.output_dir == "runs/t"


@pytest.mark.parametrize("job", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_loads(job):
    cfg = C.load(job)
    assert cfg.domains and C.parse(__import__("yaml").safe_load(C.dump(cfg))) == cfg


def test_overrides_apply_and_are_typed(tmp_path):
    cfg = C.load(_write(tmp_path, MINIMAL), ["prune.target=0.3", "calibrate.workers=3", "model.dtype=bfloat16",
                                              "recover.enabled=false", "ray.address=auto"])
    assert cfg.prune.target == 0.3 and cfg.calibrate.workers == 3 and cfg.model.dtype == "bfloat16"
    assert cfg.recover.enabled is False and cfg.ray.address == "auto"


def test_recovery_lr_defaults_to_the_measured_rate_of_its_mode():
    assert C.RecoverConfig().learning_rate == C.DEFAULT_LR["full"] == 1.5e-4
    assert C.RecoverConfig(mode="lora").learning_rate == C.DEFAULT_LR["lora"] > C.DEFAULT_LR["full"]
    assert C.RecoverConfig(mode="lora", lr=1e-3).learning_rate == 1e-3


def test_sequential_auto_turns_on_where_it_applies(tmp_path):
    job = _write(tmp_path, MINIMAL)
    assert C.PruneConfig().sequential is True and C.PruneConfig().auto_sequential  # obs, target mode
    for off in (["prune.method=taylor"], ["prune.method=depth"], ["prune.q_heads=2"], ["prune.allocate=true"],
                ["prune.method=contextual", "prune.mode=threshold"], ["search.enabled=true"]):
        assert C.load(job, off).prune.sequential is False, off
    assert C.load(job, ["prune.sequential=false"]).prune.sequential is False
    assert C.load(job, ["prune.refit_target=stream"]).prune.sequential is True
    assert C.parse(C.load(job).to_dict()) == C.load(job)  # the resolved value round-trips
    for bad, message in [(["prune.method=taylor", "prune.refit_target=stream"], "refit_target stream needs"),
                         (["prune.method=taylor", "prune.sequential=true"], "prune.sequential needs"),
                         (["search.enabled=true", "prune.sequential=true"], "does not combine with search")]:
        with pytest.raises(C.ConfigError, match=message):
            C.load(job, bad)


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
        C.load(_write(tmp_path, MINIMAL), [override])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text,message", [
    (MINIMAL + "prune:\n  metod: contextual\n", "unknown key 'prune.metod'"),
    (MINIMAL + "name: again\n", "duplicate key 'name'"),
    ("name: t\nmodel: m\ndomains: {}\n", "domains"),
    ("name: t\nmodel: m\ndomains:\n  a:\n    sources:\n      - {kind: text}\n", "needs a path"),
    ("name: t\nmodel: m\ndomains:\n  a:\n    sources: []\n", "domain 'a' has no sources"),
    ("name: t\ndomains:\n  a:\n    sources: [{kind: hpo}]\n", "missing required key(s): model"),
    ("name: [unclosed\n", "invalid YAML"),
    ("- just\n- a list\n", "YAML mapping"),
])
def test_bad_job_files(tmp_path, text, message):
    with pytest.raises(C.ConfigError) as e:
        C.load(_write(tmp_path, text))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_duplicate_domain_names_in_yaml(tmp_path):
    text = MINIMAL + "  legal:\n    sources: [{kind: hpo}]\n"
    with pytest.raises(C.ConfigError, match="duplicate key 'legal'"):
        C.load(_write(tmp_path, text))


def test_missing_file_is_one_line():
    with pytest.raises(C.ConfigError, match="job file not found"):
        C.load("/nonexistent/job.yaml")


def test_section_hash_tracks_only_named_sections(tmp_path):
    a = C.load(_write(tmp_path, MINIMAL))
    b = C.load(_write(tmp_path, MINIMAL), ["recover.steps=99"])
    assert a.section_hash("model", "data") == b.section_hash("model", "data")
    assert a.section_hash("recover") != b.section_hash("recover")
