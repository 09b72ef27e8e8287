"""Run configuration: plain dataclasses that round-trip through JSON, validated on construction.

A run is a :class:`Config` of five sections. Named presets live in :mod:`meanflow.presets`;
the command line overrides single fields with ``section.field=value``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .validation import check_choice, check_integer, check_known_keys, check_number, check_positive, parse_bool

PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


def _fail(section: str, name: str, message: str) -> None:
    raise ValueError(f"{section}.{name} {message}")


def _positive(section: str, name: str, value, allow_zero: bool = False) -> None:
    check_positive(f"{section}.{name}", value, allow_zero)


def _choice(section: str, name: str, value, valid) -> None:
    check_choice(f"{section}.{name}", value, valid)


@dataclass
class DataConfig:
    """What to train on.

    name: 'digits' (scikit-learn's 8x8 digits, the embedded default), 'toy' (2-D
        distributions, see ``toy``), 'mnist', 'fashion-mnist', 'cifar10' (torchvision download,
        or a local .npz / torchvision folder given as ``path``), 'folder' (an ImageFolder tree at
        ``path``, ADM centre crop to ``resolution``, default 256), 'latents' (a cache written by
        ``meanflow encode`` at ``path``), 'npz' (your own ``.npz`` at ``path``: ``x`` (N, ...)
        float samples or uint8 (N, C, H, W) images, optional ``labels`` (N,)), 'memory' (what
        ``meanflow.train.train(config, folder, data=...)`` sets for a tensor, array or Dataset).
    toy: the 2-D distribution when name = 'toy'.
    resolution: resize images to this size (None keeps the native size).
    horizontal_flip: random left-right flips as augmentation.
    class_conditional: use the data set's labels (class-conditional training).
    path: a local file or folder for data sets read from disk.
    skip_corrupt: skip (and count) unreadable images of a folder instead of failing.
    vae: the diffusers AutoencoderKL (hub name or local folder) that decodes latents for grids and
        evaluation; None (the default): the VAE the latent cache records it was encoded with.
    latent_normalisation: how name = 'latents' turns a raw VAE latent z into a sample: 'sd_scale'
        (0.18215 z, MeanFlow's) or 'imf_channels' ((z - mean) / std per channel with Improved
        MeanFlow's official ImageNet statistics, for 4-channel SD-VAE latents).
    """

    name: str = "digits"
    toy: str = "checkerboard"
    resolution: Optional[int] = None
    horizontal_flip: bool = False
    class_conditional: bool = True
    path: Optional[str] = None
    skip_corrupt: bool = False
    vae: Optional[str] = None
    latent_normalisation: str = "sd_scale"

    def __post_init__(self) -> None:
        from .data import DATASETS, LATENT_NORMALISATIONS

        _choice("data", "name", self.name, DATASETS)
        _choice("data", "latent_normalisation", self.latent_normalisation, LATENT_NORMALISATIONS)
        if self.latent_normalisation != "sd_scale" and self.name != "latents":
            _fail("data", "latent_normalisation", f"applies to data.name='latents' only, not {self.name!r}; "
                                                  "remove it or set it to 'sd_scale'")
        if self.name == "toy":
            from .toys import ToyDistribution

            _choice("data", "toy", self.toy, [d.value for d in ToyDistribution])
        if self.resolution is not None:
            check_integer("data.resolution", self.resolution)
        for name in ("horizontal_flip", "class_conditional", "skip_corrupt"):
            setattr(self, name, parse_bool(f"data.{name}", getattr(self, name)))
        if self.path is not None and self.name in ("digits", "toy"):
            _fail("data", "path", f"is not read by data.name={self.name!r} (it is built in); remove data.path, or "
                                  "pick a data set read from disk: 'mnist', 'fashion-mnist', 'cifar10', 'folder', "
                                  "'latents'")


@dataclass
class ModelSpec:
    """The network: an architecture name ('mlp', 'dit', 'unet') and its config's fields."""

    architecture: str = "dit"
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .models import ARCHITECTURES, model_config

        _choice("model", "architecture", self.architecture, ARCHITECTURES)
        model_config(self.architecture, self.options)  # validates the options now, not mid-run


# The flat objective section of format 1 (before settings were nested per method), and its defaults.
_LEGACY_OBJECTIVE_DEFAULTS = {
    "time_distribution": "logit_normal", "mu": -0.4, "sigma": 1.0, "fraction_r_neq_t": 0.25,
    "mask_mode": "random", "r_mu": None, "r_sigma": None, "p": 1.0, "c": 0.01, "derivative": "two_pass",
    "finite_difference_step": 1e-3, "omega": 1.0, "kappa": 0.0, "t_min": 0.0, "t_max": 1.0,
    "class_dropout": 0.1,
}
_LEGACY_RENAMES = {"time_distribution": "distribution"}


@dataclass
class ObjectiveConfig:
    """The training objective: a registered ``method`` and that method's own settings.

    In JSON the settings sit under the method's name, ``{"method": "meanflow", "meanflow":
    {...}}``, and on the command line as ``objective.meanflow.omega=2``. The objective validates
    its settings (:meth:`meanflow.objectives.Objective.parse_settings`): a setting the method
    does not have is an error naming the valid ones. ``settings`` may be the method's Settings
    record, a dict of some of its fields (the rest take the method's defaults) or None.
    """

    method: str = "meanflow"
    settings: Any = None

    def __post_init__(self) -> None:
        from .objectives import objective_class

        try:
            self.settings = objective_class(self.method).parse_settings(self.settings)
        except ValueError as error:
            raise ValueError(str(error) if str(error).startswith("objective") else f"objective: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, self.method: dataclasses.asdict(self.settings)}

    @classmethod
    def from_dict(cls, data: Any) -> "ObjectiveConfig":
        """From the nested form; a flat section of format 1 goes through :func:`translate_legacy_objective`."""
        if not isinstance(data, dict):
            raise ValueError(f"the objective section must be a JSON object, got {data!r}")
        data = dict(data)
        method = data.pop("method", "meanflow")
        if not isinstance(method, str):
            raise ValueError(f"objective.method must be a name, got {method!r}")
        if data and set(data) <= set(_LEGACY_OBJECTIVE_DEFAULTS):
            return cls(method, translate_legacy_objective(method, data))
        check_known_keys("keys in the objective section", data, [method])
        return cls(method, data.get(method))


def translate_legacy_objective(method: str, flat: dict[str, Any]) -> dict[str, Any]:
    """The one translation of a flat (format 1) objective section into ``method``'s settings.

    Fields ``method`` has keep their values (so an old run means what it meant); fields it does
    not have were ignored by format 1 and are dropped, and the FutureWarning names those that
    were not at their defaults.
    """
    from .objectives import objective_class

    valid = {f.name for f in dataclasses.fields(objective_class(method).Settings)}
    kept, dropped = {}, []
    for key, value in flat.items():
        name = _LEGACY_RENAMES.get(key, key)
        if name in valid:
            kept[name] = value
        elif value != _LEGACY_OBJECTIVE_DEFAULTS.get(key):
            dropped.append(f"{key}={value!r}")
    note = f"; dropped settings {method!r} does not use: {', '.join(dropped)}" if dropped else ""
    warnings.warn(f"a flat objective section is deprecated: its settings now sit under objective.{method} "
                  f"(translated{note}); re-save the config to update it", FutureWarning, stacklevel=3)
    return kept


LR_DECAYS = ("constant", "cosine")
MAX_LR = 1.0


@dataclass
class OptimConfig:
    """AdamW; defaults are the paper's (constant lr 1e-4, betas (0.9, 0.95), no weight decay).

    decay: after the linear warm-up, 'constant' (the paper) or 'cosine' (to 0 at
    ``training.steps``; the schedule then depends on the run's length, so extending a finished
    cosine run restarts nothing but changes the remaining rates).
    """

    lr: float = 1e-4
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: Optional[float] = None
    decay: str = "constant"

    def __post_init__(self) -> None:
        # AdamW's update is lr * m / sqrt(v): above 1 the first step already moves every weight by
        # more than its scale, and near 1e38 the float32 update overflows.
        check_number("optim.lr", self.lr, 0.0, MAX_LR, low_open=True)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            _fail("optim", "betas", f"must be two numbers in [0, 1), got {self.betas!r}")
        for index, beta in enumerate(self.betas):
            check_number(f"optim.betas[{index}]", beta, 0.0, 1.0, high_open=True)
        self.betas = tuple(self.betas)
        _positive("optim", "weight_decay", self.weight_decay, allow_zero=True)
        check_integer("optim.warmup_steps", self.warmup_steps, minimum=0)
        if self.grad_clip is not None:
            _positive("optim", "grad_clip", self.grad_clip)
        _choice("optim", "decay", self.decay, LR_DECAYS)


@dataclass
class TrainingConfig:
    """The loop: length, batch, EMA, logging, checkpoints and sample grids.

    batch_size is the global batch; under torchrun each of W processes takes batch_size / W.
    precision: 'bf16' autocasts the network (the JVP, target and loss stay fp32).
    on_nonfinite: 'skip' drops a step whose loss or gradient is not finite (counted; training
        stops after ``max_consecutive_skips`` in a row), 'stop' ends the run at once. Either way
        no NaN reaches a checkpoint.
    milestone_every: checkpoints at multiples of this step are kept beyond ``keep_checkpoints``.
    compile: a torch.compile backend ('inductor', 'aot_eager', ...) or null for eager.
    activation_checkpointing: recompute each block of the network in backward instead of keeping
        its activations (DiT, imfDiT, U-Net): less memory for about one more forward. The
        derivative's tangent is computed once, in the forward, and never recomputed.
    tf32: allow TF32 matmuls on GPU.
    parallel: under torchrun, 'ddp' (a full replica per process) or 'fsdp' (FSDP2: parameters,
        gradients, optimizer state and EMA sharded across processes, for models too large for one
        device; checkpoints are gathered to full tensors, so either mode resumes the other's).
    allow_changed_config: resume a run whose settings differ from this config (listed when
        refused); the new settings then apply from the resumed step (a new ``optim.lr`` included).
        Settings that change nothing but the run's length, logs and files never need it.
    """

    steps: int = 1000
    batch_size: int = 256
    seed: int = 0
    ema_decays: tuple = (0.9999,)
    ema_period: int = 1
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    sample_every: int = 0
    grid_samples: int = 64
    grid_steps: tuple = (1, 2)
    precision: str = "fp32"
    device: str = "auto"
    on_nonfinite: str = "skip"
    max_consecutive_skips: int = 20
    milestone_every: int = 0
    tensorboard: bool = False
    compile: Optional[str] = None
    activation_checkpointing: bool = False
    tf32: bool = True
    parallel: str = "ddp"
    allow_changed_config: bool = False

    def __post_init__(self) -> None:
        s = "training"
        for name in ("steps", "batch_size", "ema_period", "log_every", "checkpoint_every", "keep_checkpoints",
                     "grid_samples"):
            check_integer(f"training.{name}", getattr(self, name))
        check_integer("training.seed", self.seed, minimum=0)
        check_integer("training.sample_every", self.sample_every, minimum=0)
        if not isinstance(self.ema_decays, (list, tuple)) or not self.ema_decays:
            _fail(s, "ema_decays", f"must be one or more numbers in (0, 1), got {self.ema_decays!r}")
        for decay in self.ema_decays:
            check_number("training.ema_decays", decay, 0.0, 1.0, low_open=True, high_open=True)
        self.ema_decays = tuple(float(d) for d in self.ema_decays)
        if not isinstance(self.grid_steps, (list, tuple)) or not self.grid_steps:
            _fail(s, "grid_steps", f"must be one or more positive step counts, got {self.grid_steps!r}")
        for steps in self.grid_steps:
            check_integer("training.grid_steps", steps)
        self.grid_steps = tuple(self.grid_steps)
        _choice(s, "precision", self.precision, PRECISIONS)
        _choice(s, "on_nonfinite", self.on_nonfinite, ("skip", "stop"))
        _choice(s, "parallel", self.parallel, ("ddp", "fsdp"))
        check_integer("training.max_consecutive_skips", self.max_consecutive_skips)
        check_integer("training.milestone_every", self.milestone_every, minimum=0)
        _choice(s, "device", self.device, DEVICES)
        for name in ("tensorboard", "tf32", "allow_changed_config", "activation_checkpointing"):
            setattr(self, name, parse_bool(f"training.{name}", getattr(self, name)))


SECTIONS = {
    "data": DataConfig,
    "model": ModelSpec,
    "objective": ObjectiveConfig,
    "optim": OptimConfig,
    "training": TrainingConfig,
}


@dataclass
class Config:
    """A whole run. ``note`` is free text (presets record the paper's numbers there)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = {name: _section_to_dict(getattr(self, name)) for name in SECTIONS}
        out["note"] = self.note
        return json.loads(json.dumps(out))  # tuples -> lists: exactly what the JSON file holds

    @classmethod
    def from_dict(cls, data: Any) -> "Config":
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a JSON object with the sections {sorted(SECTIONS)}; "
                             f"got a {type(data).__name__}")
        check_known_keys("config sections", data, [*SECTIONS, "note"])
        for name in SECTIONS:
            if not isinstance(data.get(name, {}), dict):
                raise ValueError(f"config section {name!r} must be a JSON object of fields, got {data[name]!r}")
        sections = {}
        for name, section_class in SECTIONS.items():
            values = data.get(name, {})
            if section_class is ObjectiveConfig:
                sections[name] = ObjectiveConfig.from_dict(values)
                continue
            check_known_keys(f"fields in section {name!r}", values, [f.name for f in dataclasses.fields(section_class)])
            sections[name] = section_class(**values)
        return cls(**sections, note=str(data.get("note", "")))

    def save(self, path: str | Path) -> None:
        from .io import write_text_atomic

        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"config file {path} is a folder; give the JSON file (a run's config.json)")
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist") from None
        except UnicodeDecodeError:
            raise ValueError(f"config file {path} is not a text (JSON) file") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {path} is not valid JSON: {error}") from None
        return cls.from_dict(data)

    def with_overrides(self, overrides: list[str]) -> "Config":
        """Apply ``section.field=value`` strings; values parse as JSON (True / False / None as
        Python spells them too), else stay strings.

        ``model.options.hidden_size=64`` reaches into the model's options and
        ``objective.meanflow.omega=2`` into the objective's settings. ``objective.method=NAME``
        is applied first: switching the method starts its settings from that method's defaults
        (nothing of the old method's settings is carried over), and the other overrides then
        apply to them.
        """
        data = self.to_dict()
        parsed = [_parse_override(item) for item in overrides]
        parsed.sort(key=lambda entry: entry[1] != ["objective", "method"])  # stable: the method first
        for item, parts, value in parsed:
            if parts == ["note"]:
                data["note"] = value
                continue
            if parts[0] not in SECTIONS or len(parts) < 2:
                raise ValueError(f"override {item!r}: the key must be section.field with a section in {sorted(SECTIONS)}")
            if parts == ["objective", "method"]:
                if value != data["objective"]["method"]:
                    data["objective"] = ObjectiveConfig(value).to_dict()  # the new method's defaults
                continue
            target = data[parts[0]]
            if parts[0] == "objective" and len(parts) > 2 and parts[1] != target["method"]:
                raise ValueError(f"override {item!r}: objective.{parts[1]}.* are the settings of method {parts[1]!r}, "
                                 f"but the method is {target['method']!r}; add --set objective.method={parts[1]}")
            for part in parts[1:-1]:
                if not isinstance(target.get(part), dict):
                    raise ValueError(f"override {item!r}: {part!r} is not a group of fields; groups here are "
                                     f"{sorted(k for k, v in target.items() if isinstance(v, dict))}")
                target = target[part]
            if parts[0] != "model" or len(parts) == 2:
                if parts[-1] not in target:
                    raise ValueError(f"override {item!r}: unknown field {parts[-1]!r}; valid fields are {sorted(target)}")
            target[parts[-1]] = value
        return Config.from_dict(data)


_PYTHON_LITERALS = {"True": True, "False": False, "None": None}


def _parse_override(item: str) -> tuple[str, list[str], Any]:
    """``"section.field=value"`` -> (item, ["section", "field"], parsed value)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} must look like section.field=value")
    if raw.strip() in _PYTHON_LITERALS:
        value = _PYTHON_LITERALS[raw.strip()]
    else:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
    return item, key.strip().split("."), value


def _section_to_dict(section) -> dict[str, Any]:
    return section.to_dict() if isinstance(section, ObjectiveConfig) else dataclasses.asdict(section)
