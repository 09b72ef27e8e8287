"""The objective registry and the nested, validated objective settings of the config."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from meanflow.config import Config, ObjectiveConfig
from meanflow.conventions import Batch, interpolate
from meanflow.objectives import (
    OBJECTIVES,
    FlowMatching,
    MeanFlow,
    NoiseTimeObjective,
    build_objective,
    register_objective,
)
from meanflow.objectives.loss import AdaptiveWeighting
from meanflow.presets import preset
from meanflow.samplers import AverageVelocitySampler, VelocityOdeSampler


@dataclasses.dataclass(frozen=True, kw_only=True)
class EndpointSettings:
    """A toy objective's knobs: regress u(z_t, 0, t) onto (z_t - x) / t, its exact average velocity."""

    t_floor: float = 0.05
    class_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.t_floor < 1.0:
            raise ValueError(f"t_floor must lie in (0, 1), got {self.t_floor}")


class EndpointObjective(NoiseTimeObjective):
    """Written here, outside the package: r = 0 always, t uniform in [t_floor, 1]. Its progress
    argument is recorded so the test sees the loop's training progress."""

    name = "endpoint_test"
    Settings = EndpointSettings
    seen_progress: list = []

    def __init__(self, settings: EndpointSettings, num_classes):
        self.settings, self.num_classes = settings, num_classes
        self.weighting = AdaptiveWeighting(p=0.0)
        self.class_dropout = settings.class_dropout

    @classmethod
    def from_settings(cls, settings, num_classes):
        return cls(cls.parse_settings(settings), num_classes)

    @property
    def sampler(self):
        return AverageVelocitySampler()

    def sample_times(self, batch_size, like, generator, progress=0.0):
        EndpointObjective.seen_progress.append(progress)
        t = self.settings.t_floor + (1 - self.settings.t_floor) * torch.rand(batch_size, generator=generator,
                                                                             dtype=like.dtype)
        return torch.zeros_like(t), t

    def compute(self, model, x, noise, r, t, labels=None):
        z = interpolate(x, noise, t)
        return model(z, r, t, labels), (noise - x).detach()  # u(z_t, 0, t) = e - x on the linear path


@pytest.fixture
def endpoint_registered():
    register_objective(EndpointObjective)
    EndpointObjective.seen_progress = []
    yield EndpointObjective
    OBJECTIVES.pop(EndpointObjective.name, None)


def tiny_toy_config(steps: int = 6) -> Config:
    return preset("toy-checkerboard").with_overrides([
        f"training.steps={steps}", "training.batch_size=32", "training.checkpoint_every=3", "training.log_every=3",
        "training.grid_steps=[1]", "training.grid_samples=16", "model.options.hidden_size=16",
        "model.options.depth=2"])


def test_an_objective_written_outside_the_package_plugs_in_and_trains(endpoint_registered, tmp_path):
    from meanflow.inference import load_model
    from meanflow.train import train

    config = tiny_toy_config().with_overrides(["objective.method=endpoint_test",
                                                "objective.endpoint_test.t_floor=0.2"])
    assert config.to_dict()["objective"] == {"method": "endpoint_test",
                                             "endpoint_test": {"t_floor": 0.2, "class_dropout": 0.0}}
    result = train(config, tmp_path / "run", progress=False)
    assert result.step == 6 and torch.isfinite(torch.tensor(result.metrics["loss"]))
    # The loop reports the share of training done, before each step: 0, 1/6, ..., 5/6.
    assert EndpointObjective.seen_progress == pytest.approx([k / 6 for k in range(6)])
    loaded = load_model(tmp_path / "run")
    assert loaded.record.method == "endpoint_test" and loaded.sampler == AverageVelocitySampler()


def test_register_refuses_a_clash_and_a_class_without_settings():
    class Clash(NoiseTimeObjective):
        name = "meanflow"
        Settings = dict

    with pytest.raises(ValueError, match="already registered"):
        register_objective(Clash)

    class NoSettings(NoiseTimeObjective):
        name = "no_settings"

    with pytest.raises(ValueError, match="Settings"):
        register_objective(NoSettings)


def test_each_objective_declares_its_sampler():
    assert MeanFlow().sampler == AverageVelocitySampler()
    assert FlowMatching().sampler == VelocityOdeSampler("euler")


@pytest.mark.parametrize("override, message", [
    ("objective.meanflow.omega_prime=2", r"unknown field 'omega_prime'; valid fields are \['c', 'class_dropout'"),
    ("objective.flow_matching.mu=0", "settings of method 'flow_matching', but the method is 'meanflow'"),
    ("objective.method=no_such_method", "objective.method must be one of"),
    ("objective.meanflow.sigma=NaN", "sigma must be a finite number > 0"),
    ("objective.meanflow.omega=-1", "omega must be a finite number >= 0"),
])
def test_unknown_or_bad_settings_are_refused_naming_what_is_valid(override, message):
    with pytest.raises(ValueError, match=message):
        preset("digits").with_overrides([override])


def test_a_setting_the_chosen_method_does_not_use_is_an_error():
    with pytest.raises(ValueError, match=r"unknown field 'omega'; valid fields are \['c', 'class_dropout', "
                                         r"'distribution', 'mu', 'p', 'sigma'\]"):
        preset("digits").with_overrides(["objective.method=flow_matching", "objective.flow_matching.omega=2"])
    with pytest.raises(ValueError, match=r"unknown settings for objective 'flow_matching' \['omega'\]"):
        ObjectiveConfig.from_dict({"method": "flow_matching", "flow_matching": {"omega": 2}})
    with pytest.raises(ValueError, match="valid ones are .*'class_dropout'.*'sigma'"):
        ObjectiveConfig("flow_matching", {"fraction_r_neq_t": 0.5})


def test_switching_the_method_is_one_override_and_starts_from_its_defaults():
    config = preset("digits").with_overrides(["objective.flow_matching.p=0.5", "objective.method=flow_matching"])
    section = config.to_dict()["objective"]
    assert list(section) == ["method", "flow_matching"]  # no MeanFlow settings left behind
    assert section["flow_matching"]["p"] == 0.5  # applied after the switch, whatever the order given
    plain = preset("digits").with_overrides(["objective.method=flow_matching"]).objective.settings
    assert plain.p == 0.0  # flow matching's own default: the plain squared error, not MeanFlow's p = 1


def test_a_flat_config_of_format_1_loads_through_one_translation_with_a_warning(tmp_path):
    flat = preset("digits").to_dict()
    flat["objective"] = {"method": "flow_matching", "time_distribution": "uniform", "mu": -0.4, "sigma": 1.0,
                         "fraction_r_neq_t": 0.25, "p": 1.0, "c": 0.01, "omega": 3.0, "kappa": 0.0,
                         "class_dropout": 0.2}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(flat))
    with pytest.warns(FutureWarning, match=r"deprecated.*dropped settings 'flow_matching' does not use: omega=3.0"):
        config = Config.load(path)
    settings = config.objective.settings
    assert (settings.distribution, settings.p, settings.class_dropout) == ("uniform", 1.0, 0.2)  # meaning kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Config.from_dict(config.to_dict()).to_dict() == config.to_dict()  # the new form: no warning


def test_build_objective_checks_the_network_and_the_parallel_setup():
    from meanflow.models.mlp import MLP, MLPConfig

    unconditional = MLP(MLPConfig(data_dim=2, hidden_size=8, depth=2))
    with pytest.raises(ValueError, match=r"passes the conditions \['labels'\].*accepts none"):
        build_objective("meanflow", None, num_classes=3, model=unconditional)
    assert build_objective("meanflow", None, None, model=unconditional).num_classes is None
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        build_objective("meanflow", {"derivative": "jvp"}, None, data_parallel=True)
    build_objective("meanflow", {"derivative": "jvp"}, None, data_parallel=True, sharded=True)


def test_loss_takes_a_batch_record_and_checks_progress():
    objective = MeanFlow()
    model = lambda z, r, t, c=None: torch.zeros_like(z)  # noqa: E731
    x = torch.randn(8, 2)
    a = objective.loss(model, Batch(x), generator=torch.Generator().manual_seed(0), progress=0.5)
    b = objective.loss(model, x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.loss, b.loss)
    with pytest.raises(ValueError, match=r"progress must be a finite number in \[0, 1\]"):
        objective.loss(model, Batch(x), progress=1.5)


def test_settings_records_take_keyword_arguments_only():
    from meanflow.objectives import (
        AdaptiveWeighting,
        MeanFlowSettings,
        TimeSampler,
        TrainingGuidance,
    )

    for record in (TimeSampler, TrainingGuidance, AdaptiveWeighting, MeanFlowSettings):
        with pytest.raises(TypeError):
            record(0.5)
