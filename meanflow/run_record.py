"""What a run is, as one record: the data every reader of a run folder needs.

A checkpoint folder ``checkpoints/step_<n>/`` holds, beside its weights, ``run.json``: the
:class:`RunRecord` of the run, written atomically with the checkpoint. It says

- ``config``: the whole run configuration (:class:`meanflow.config.Config` as JSON);
- ``model``: the network's architecture and options (enough to rebuild it);
- ``encoder``: the space of the samples (:mod:`meanflow.encoders`: pixels, VAE latents, points);
- ``objective``: the training method and its settings;
- ``sampler``: how the network is sampled (:mod:`meanflow.samplers`), declared by the objective;
- ``num_classes``, ``class_names`` and the names of the EMA copies;
- ``format_version``, checked on load.

``meanflow sample``, ``meanflow eval``, the sample grids and :mod:`meanflow.inference` read it,
so none of them has to be told what the run was. Checkpoints written before the record existed
(format 1: a ``trainer.json`` with the config and a ``data_info`` entry) are read through
:func:`record_from_format_1`, the one translation of the old layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from torch import nn

from .checkpoint import read_json_object
from .encoders import Encoder, LatentEncoder, PixelEncoder, PointEncoder, encoder_from_dict
from .samplers import Sampler, sampler_from_dict

RUN_FILE = "run.json"
RUN_FORMAT = "meanflow-run"
RUN_FORMAT_VERSION = 2
KNOWN_VERSIONS = (1, 2)  # 1: the layout before run.json, translated on load


@dataclass(frozen=True)
class RunRecord:
    """See the module docstring. Built by the trainer from the run's parts; read back by
    :meth:`load`."""

    config: dict
    model: dict
    encoder: dict
    objective: dict
    sampler: dict
    num_classes: Optional[int]
    ema_names: tuple = ()
    class_names: Optional[tuple] = None
    format_version: int = RUN_FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    # -- the parts, rebuilt ---------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from .models import build_model

        return build_model(self.model["architecture"], self.model["options"])

    def build_encoder(self) -> Encoder:
        return encoder_from_dict(self.encoder)

    def build_sampler(self) -> Sampler:
        return sampler_from_dict(self.sampler)

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.encoder["sample_shape"])

    @property
    def method(self) -> str:
        return self.objective["method"]

    # -- as data --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "config": self.config,
            "model": self.model, "encoder": self.encoder, "objective": self.objective, "sampler": self.sampler,
            "num_classes": self.num_classes, "class_names": None if self.class_names is None else list(self.class_names),
            "ema_names": list(self.ema_names), **({"extra": self.extra} if self.extra else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = "run record") -> "RunRecord":
        if not isinstance(data, dict):
            raise ValueError(f"{source} is not a JSON object: it is not a run record")
        check_version(data.get("format_version"), source)
        _check_entries(data, source)
        names = data.get("class_names")
        return cls(config=data["config"], model=data["model"], encoder=data["encoder"], objective=data["objective"],
                   sampler=data["sampler"], num_classes=data.get("num_classes"),
                   ema_names=tuple(data.get("ema_names", ())), class_names=None if names is None else tuple(names),
                   extra=dict(data.get("extra", {})))

    @classmethod
    def load(cls, checkpoint: Path) -> "RunRecord":
        """The record of a checkpoint folder: its ``run.json``, or a translated format-1 ``trainer.json``."""
        checkpoint = Path(checkpoint)
        path = checkpoint / RUN_FILE
        if path.is_file():
            return cls.from_dict(_read_json(path, "run record"), str(path))
        trainer = checkpoint / "trainer.json"
        if trainer.is_file():
            data = _read_json(trainer, "trainer state")
            check_version(data.get("format_version", 1), str(trainer))
            if data.get("format_version", 1) == 1:
                return record_from_format_1(data, str(trainer))
        raise ValueError(f"{checkpoint} holds no {RUN_FILE}: it is not a checkpoint folder of this library")


def build_record(config, encoder: Encoder, objective, num_classes: Optional[int], ema_names,
                 class_names: Optional[list] = None) -> RunRecord:
    """The record of a run from its config and the parts the trainer built."""
    data = config.to_dict()
    return RunRecord(config=data, model=data["model"], encoder=encoder.to_dict(), objective=data["objective"],
                     sampler=objective.sampler.to_dict(), num_classes=num_classes, ema_names=tuple(ema_names),
                     class_names=None if class_names is None else tuple(class_names))


def check_version(version: Any, source: str) -> None:
    """Refuse a record of a format this version of the library does not know."""
    if version not in KNOWN_VERSIONS:
        raise ValueError(f"{source} has format version {version!r}; this version of meanflow reads versions "
                         f"{list(KNOWN_VERSIONS)}. Upgrade meanflow to read it")


def record_from_format_1(trainer: dict, source: str = "trainer.json") -> RunRecord:
    """The one translation of a format-1 checkpoint (config and ``data_info`` in trainer.json)."""
    import warnings

    missing = [key for key in ("config", "model", "data_info") if key not in trainer]
    missing += [f"data_info.{key}" for key in ("sample_shape", "kind", "num_classes")
                if isinstance(trainer.get("data_info"), dict) and key not in trainer["data_info"]]
    if missing:
        raise ValueError(f"{source} lacks {missing} and the folder holds no {RUN_FILE}: it is not a complete "
                         f"checkpoint. {_DAMAGED}")

    from .config import Config
    from .objectives import objective_class
    from .vae import DEFAULT_VAE

    with warnings.catch_warnings():  # the flat objective section is expected here; no warning
        warnings.simplefilter("ignore", FutureWarning)
        config = Config.from_dict(trainer["config"])
    info = trainer["data_info"]
    shape = tuple(info["sample_shape"])
    encoder = {"image": lambda: PixelEncoder(shape),
               "latent": lambda: LatentEncoder(shape, vae=config.data.vae or DEFAULT_VAE),
               "points": lambda: PointEncoder(shape, reference=config.data.toy if config.data.name == "toy" else None),
               }[info["kind"]]()
    objective = objective_class(config.objective.method).from_settings(config.objective.settings, info["num_classes"])
    data = config.to_dict()
    return RunRecord(config=data, model=dict(trainer["model"]), encoder=encoder.to_dict(), objective=data["objective"],
                     sampler=objective.sampler.to_dict(), num_classes=info["num_classes"],
                     ema_names=tuple(trainer.get("ema_names", ())), format_version=1)


_DAMAGED = ("The checkpoint is damaged (a copy or write cut short?): copy it again from where it came from, or use "
            "another checkpoint of the run (each step_<n> folder holds its own record)")
# Each entry a reader rebuilds from, with the fields it cannot do without.
_ENTRIES = {"config": (), "model": ("architecture", "options"), "encoder": ("name",), "objective": ("method",),
            "sampler": ("name",)}


def _check_entries(data: dict, source: str) -> None:
    """Refuse a record without the entries (or their fields) that rebuilding a run needs."""
    missing = [key for key in _ENTRIES if key not in data]
    if missing:
        raise ValueError(f"{source} lacks {missing}: it is not a complete run record. {_DAMAGED}")
    for key, fields in _ENTRIES.items():
        if not isinstance(data[key], dict):
            raise ValueError(f"{source}: {key!r} is a JSON {type(data[key]).__name__}, not an object. {_DAMAGED}")
        absent = [name for name in fields if name not in data[key]]
        if absent:
            raise ValueError(f"{source}: {key!r} lacks {absent}: it is not a complete run record. {_DAMAGED}")


def _read_json(path: Path, what: str) -> dict:
    """A JSON object file of a checkpoint; missing, empty, corrupt or not an object: a ValueError."""
    return read_json_object(path, what)
