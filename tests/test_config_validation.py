"""Bad settings are refused at the edge with a message naming the field and what is valid.

Each case was once silently accepted or ended in a raw exception (issue 10).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from meanflow.config import Config
from meanflow.objectives import MeanFlow, TimeSampler
from meanflow.presets import preset
from meanflow.sampling import sample


@pytest.mark.parametrize("override, message", [
    ("objective.meanflow.omega=NaN", "omega must be a finite number >= 0; got nan"),
    ("objective.meanflow.sigma=NaN", "sigma must be a finite number > 0; got nan"),
    ("objective.meanflow.mu=NaN", "mu must be a finite number"),
    ("objective.meanflow.kappa=Infinity", "kappa must be a finite number in [0, 1)"),
    ("training.seed=\"abc\"", "training.seed must be an integer >= 0, got 'abc'"),
    ("training.seed=1.5", "training.seed must be an integer >= 0, got 1.5"),
    ("optim.lr=1e39", "optim.lr must be a finite number in (0, 1]; got 1e+39"),
    ("optim.lr=NaN", "optim.lr must be a finite number in (0, 1]; got nan"),
    ("data.horizontal_flip=\"maybe\"", "data.horizontal_flip must be true or false (also 1 / 0); got 'maybe'"),
    ("data.path=digits.npz", "data.path is not read by data.name='digits'"),
    ("training.ema_decays=[1.5]", "training.ema_decays must be a finite number in (0, 1)"),
    ("training.grid_steps=[0]", "training.grid_steps must be a positive integer, got 0"),
])
def test_bad_settings_are_refused_naming_the_field(override, message):
    with pytest.raises(ValueError) as error:
        preset("digits").with_overrides([override])
    assert message in str(error.value)


@pytest.mark.parametrize("given, expected", [("False", False), ("false", False), ("0", False), ("True", True),
                                             ("true", True), ("1", True)])
def test_booleans_are_parsed_strictly_in_every_spelling(given, expected):
    config = preset("digits").with_overrides([f"data.horizontal_flip={given}"])
    assert config.data.horizontal_flip is expected  # never the truthy string "False"


def test_nan_in_the_explicit_inputs_and_the_time_law_is_refused():
    x = torch.zeros(2, 3)
    model = lambda z, r, t, c=None: torch.zeros_like(z)  # noqa: E731
    with pytest.raises(ValueError, match="times must be finite"):
        MeanFlow().prediction_and_target(model, x, x, torch.tensor([0.1, math.nan]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="sigma must be a finite number > 0; got nan"):
        TimeSampler(sigma=math.nan)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        sample(model, x, torch.tensor([0, 1]), guidance_scale=math.nan, null_label=2)


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "a config must be a JSON object with the sections"),
    ('{"optim": 3}', "config section 'optim' must be a JSON object of fields, got 3"),
    ('{"optim": {"lr": 0.1', "is not valid JSON"),
    ('{"trainer": {}}', "unknown config sections ['trainer']"),
])
def test_a_malformed_config_file_is_refused_clearly(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ValueError) as error:
        Config.load(path)
    assert message in str(error.value)


def test_a_config_path_that_is_a_folder_or_binary_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a folder; give the JSON file"):
        Config.load(tmp_path)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x80\x04\x95\xff")
    with pytest.raises(ValueError, match="not a text"):
        Config.load(binary)
    assert json.loads(json.dumps(preset("digits").to_dict()))  # the presets themselves stay valid
