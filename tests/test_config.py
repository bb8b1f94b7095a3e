"""Configs: presets, validation, and the config.json round trip."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from ppl_vae.config import PRESETS, RunConfig, burda_epochs, from_dict, preset, to_dict, with_model
from ppl_vae.errors import ConfigError


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_survives_a_json_round_trip(name):
    cfg = PRESETS[name]
    again = from_dict(RunConfig, json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg
    assert isinstance(again.runs_dir, Path) and isinstance(again.model.hidden, tuple)


def test_presets_match_their_references():
    pyro_example, burda = preset("pyro-example"), preset("burda-1l")
    assert (pyro_example.model.z_dim, pyro_example.model.hidden) == (50, (400,))
    assert (pyro_example.train.batch_size, pyro_example.train.lr) == (256, 1e-3)
    assert (burda.model.hidden, burda.model.activation, burda.train.batch_size) == (
        (200, 200),
        "tanh",
        20,
    )
    assert burda.train.epochs == burda_epochs() == 3280
    with pytest.raises(ConfigError, match="--preset 'nope' is unknown"):
        preset("nope")


def test_configs_are_frozen_and_unknown_fields_are_rejected():
    cfg = RunConfig()
    with pytest.raises(FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]
    data = to_dict(cfg)
    data["train"]["epochz"] = 3
    with pytest.raises(ConfigError, match=r"train: unknown field\(s\) \['epochz'\] of TrainConfig"):
        from_dict(RunConfig, data)
    assert with_model(cfg, "vae") is cfg
