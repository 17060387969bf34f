import json

import pytest

from learner.config import PRESETS, ConfigError, PolicyConfig, Preset, TrainConfig, from_dict, get_preset, to_dict


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_survives_a_json_round_trip(name):
    preset = get_preset(name)
    assert Preset.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset


def test_an_unknown_field_is_rejected_loudly():
    data = to_dict(TrainConfig())
    data["learning_rate"] = 1.0
    with pytest.raises(ConfigError, match="learning_rate"):
        from_dict(TrainConfig, data)


def test_a_missing_field_takes_its_default_so_older_runs_still_load():
    data = to_dict(PolicyConfig())
    del data["loss"]
    assert from_dict(PolicyConfig, data).loss == "l1"


def test_invalid_values_are_rejected():
    with pytest.raises(ConfigError):
        TrainConfig(sampler_a=1.0)
    with pytest.raises(ConfigError):
        TrainConfig(clip=(0.9, 0.1))
    with pytest.raises(ConfigError):
        PolicyConfig(state_indices=(0, 39))


def test_an_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="default"):
        get_preset("huge")
