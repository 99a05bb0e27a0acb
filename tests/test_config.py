import pytest

from excitation_dist import ConfigError, ExcitationConfig


def test_defaults_reproduce_the_paper():
    cfg = ExcitationConfig()
    assert (cfg.strategy, cfg.gamma, cfg.floor, cfg.ceiling, cfg.utilization_ema, cfg.warmup_steps) == (
        "zerosum", 1.0, None, None, 0.0, 0)
    assert cfg.counts == "processed" and cfg.renormalize_energy is False


@pytest.mark.parametrize(
    "values, field, hint",
    [
        ({"strategy": "zero_sum"}, "strategy", "zerosum"),
        ({"gamma": -0.5}, "gamma", ">= 0"),
        ({"gamma": "high"}, "gamma", "number"),
        ({"floor": 1.5}, "floor", "[0, 1]"),
        ({"ceiling": 0.5}, "ceiling", ">= 1"),
        ({"utilization_ema": 1.0}, "utilization_ema", "[0, 1)"),
        ({"warmup_steps": -1}, "warmup_steps", "integer"),
        ({"warmup_steps": 2.5}, "warmup_steps", "integer"),
        ({"counts": "dropped"}, "counts", "processed, routed"),
        ({"renormalize_energy": "yes"}, "renormalize_energy", "true or false"),
    ],
)
def test_errors_name_the_field_and_the_allowed_values(values, field, hint):
    with pytest.raises(ConfigError) as err:
        ExcitationConfig.from_dict(values)
    assert f"excitation.{field}" in str(err.value) and hint in str(err.value)


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="unknown excitation key.*gama.*allowed keys: strategy, gamma"):
        ExcitationConfig.from_dict({"gama": 1.0})


def test_from_yaml_reads_the_excitation_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {layers: 2}\nexcitation:\n  strategy: positivesum\n  gamma: 2\n  floor: 0.1\n")
    cfg = ExcitationConfig.from_yaml(path)
    assert (cfg.strategy, cfg.gamma, cfg.floor) == ("positivesum", 2, 0.1)
    flat = tmp_path / "flat.yaml"
    flat.write_text("strategy: expdiff\n")
    assert ExcitationConfig.from_yaml(flat).strategy == "expdiff"


def test_from_yaml_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ExcitationConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("excitation: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ExcitationConfig.from_yaml(bad)


def test_round_trip():
    cfg = ExcitationConfig(strategy="expdiff", gamma=0.5, ceiling=3.0, warmup_steps=10)
    assert ExcitationConfig.from_dict(cfg.to_dict()) == cfg
