"""The released Improved MeanFlow weights (``iMF-{B,M,L,XL}-2.pth``) as a meanflow run folder.

What the official code (Lyy-iiis/imeanflow, ``torch`` branch) says about the files:
``evaluate.py`` builds ``iMeanFlow(args.model)`` (``imf.py``: the network is the attribute
``net``, built with ``eval_mode=True``, so without the ``v`` head's blocks), then
``model.load_state_dict(torch.load(ckpt_path, map_location='cpu'))``. A file is therefore one
flat dict of tensors, the wrapper's state dict: every key starts with ``net.``, nothing is nested
and no optimizer or EMA state rides along. We still accept the dict nested under one key
(``model``, ``state_dict``, ``ema``, ``net``, ``module``), as re-saved copies often are.

The rename (docs/imf.md): strip ``net.``, delete the wrapper segments ``._flax_linear`` and
``._flax_embedding``; shapes are unchanged. Dropped on purpose, and reported: the training-only
``v_heads.*`` blocks (absent from the released files) and RoPE tables (rebuilt from the config).
Anything else missing, unexpected or of another shape is an error naming the keys.

The layout is read from the shapes (:func:`infer_config`), or taken from ``preset``; the run
record holds the official latent normalisation and the authors' 1-NFE guidance for the size.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..models.imf_dit import IMF_DIT_PRESETS, ImfDiT, ImfDiTConfig, imf_dit_preset
from ..data.latent_source import IMF_LATENT_MEAN, IMF_LATENT_STD

SOURCE_FORMAT = "imf-torch"
NESTING_KEYS = ("model", "state_dict", "ema", "net", "module")
"""Keys under which a re-saved copy may nest the state dict (the released files do not)."""
# The official per-channel normalisation of SD-VAE latents (torch branch, utils/vae_util.py).
OFFICIAL_VAE = "stabilityai/sd-vae-ft-mse"
# The authors' 1-NFE settings (README of the torch branch): omega and [t_min, t_max].
ONE_NFE_GUIDANCE = {
    "iMF-B/2": (8.0, (0.40, 0.65)),
    "iMF-M/2": (10.5, (0.40, 0.60)),
    "iMF-L/2": (10.5, (0.40, 0.60)),
    "iMF-XL/2": (8.0, (0.42, 0.62)),
}
DEFAULT_GUIDANCE = ONE_NFE_GUIDANCE["iMF-B/2"]  # evaluate.py's defaults, for layouts that are no preset

_WRAPPER_SEGMENTS = re.compile(r"\._flax_(linear|embedding)(?=\.)")
_DROPPED = (
    (re.compile(r"^v_heads\."), "v_heads.*: the auxiliary v head's blocks, used only in training"),
    (re.compile(r"^rope_(freqs|cos|sin)$"), "the RoPE table, rebuilt from the config"),
)


@dataclass(frozen=True)
class Conversion:
    """What :func:`convert_imf_details` wrote: the run folder, its checkpoint, the layout (a
    preset name or None when inferred), the config, where the weights sat in the file, what was
    dropped on purpose (reason -> count) and the run's guidance."""

    run: Path
    checkpoint: Path
    preset: Optional[str]
    config: ImfDiTConfig
    nesting_key: Optional[str]
    tensors: int
    dropped: dict
    omega: float
    interval: tuple


def read_official_file(path: str | Path) -> tuple[dict[str, Tensor], Optional[str]]:
    """The state dict in an official ``.pth`` file, read with ``weights_only=True`` (no code is
    ever run), and the key it was nested under (None: the file is the dict itself)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - an unpickling refusal, a damaged or foreign file
        # torch's own message advises loading the pickle unrestricted; that advice is not relayed.
        reason = type(error).__name__
        raise ValueError(f"{path} is refused: torch.load(weights_only=True) could not read it as a file of tensors "
                         f"({reason}); it holds Python objects beyond tensors (which would run code if "
                         f"unpickled, so meanflow never does), or it is damaged or not a torch.save file. The "
                         f"released iMF-*.pth files are plain state dicts of tensors") from None
    nesting = None
    if isinstance(data, dict) and len(data) == 1:
        (key, inner), = data.items()
        if key in NESTING_KEYS and isinstance(inner, dict):
            nesting, data = key, inner
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a state dict (a dict of tensor names to "
                         f"tensors, as the released iMF-*.pth files are)")
    wrong = [(key, value) for key, value in data.items() if not (isinstance(key, str) and isinstance(value, Tensor))]
    if wrong:
        shown = ", ".join(f"{key!r}: {type(value).__name__}" for key, value in wrong[:3])
        raise ValueError(f"{path} is not a dict of tensors: {len(wrong)} of its {len(data)} entries are not "
                         f"name -> tensor ({shown}{', ...' if len(wrong) > 3 else ''})")
    if not data:
        raise ValueError(f"{path} holds an empty dict: no weights")
    return data, nesting


def rename_official(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official keys -> ours: strip ``net.``, delete ``._flax_linear`` / ``._flax_embedding``."""
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        ours = _WRAPPER_SEGMENTS.sub("", key.removeprefix("net."))
        if ours in renamed:
            raise ValueError(f"two keys of the file map to {ours!r} (one of them {key!r}): it mixes keys with and "
                             f"without the 'net.' prefix")
        renamed[ours] = value
    return renamed


def split_dropped(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, int]]:
    """(the weights kept, reason -> number of tensors dropped on purpose)."""
    kept, dropped = {}, {}
    for key, value in state.items():
        reason = next((why for pattern, why in _DROPPED if pattern.search(key)), None)
        if reason is None:
            kept[key] = value
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    return kept, dropped


def _shape(state: dict[str, Tensor], key: str, dims: int) -> tuple:
    if key not in state:
        raise ValueError(f"the file lacks {key!r} (officially 'net.' + that key, with '._flax_linear' or "
                         f"'._flax_embedding' in its wrapper modules), so its layout cannot be read from the shapes: "
                         f"it is not an iMF state dict (give --preset to see every difference from one)")
    shape = tuple(state[key].shape)
    if len(shape) != dims:
        raise ValueError(f"{key!r} has shape {shape}; an iMF state dict has {dims} dimensions there")
    return shape


def _block_count(state: dict[str, Tensor], group: str) -> int:
    indices = {int(match.group(1)) for key in state if (match := re.match(rf"^{group}\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0  # gaps show up in the strict check as missing keys


def infer_config(state: dict[str, Tensor], input_size: int = 32) -> ImfDiTConfig:
    """The :class:`ImfDiTConfig` (``auxiliary_head=False``) that the renamed weights' shapes say.

    Hidden size and token counts from the conditioning tokens, depth and head depth from the block
    indices, heads from the per-head q-norm, patch and channels from the patch embedding, classes
    from the label table (one row is the null class), frequencies and MLP width from the
    embedders. The spatial size is not in the weights (RoPE tables are rebuilt): ``input_size``
    (32: ImageNet 256 in SD-VAE latents).
    """
    hidden_size = _shape(state, "class_tokens", 2)[1]
    proj = _shape(state, "x_embedder.proj.weight", 4)
    aux = _block_count(state, "u_heads")
    if aux == 0:
        raise ValueError("the file has no u_heads.* blocks: it is not an iMF state dict")
    head_dim = _shape(state, "u_heads.0.attn.q_norm.weight", 1)[0]
    if hidden_size % head_dim:
        raise ValueError(f"q_norm has {head_dim} channels, which does not divide the hidden size {hidden_size}")
    mlp_width = _shape(state, "u_heads.0.mlp.w1.weight", 2)[0]
    mlp_ratio = 8 / 3 if int(hidden_size * 8 / 3) == mlp_width else mlp_width / hidden_size
    if int(hidden_size * mlp_ratio) != mlp_width:
        raise ValueError(f"the MLP width {mlp_width} is no ratio of the hidden size {hidden_size} that "
                         f"int(hidden * ratio) reproduces; give --preset")
    return ImfDiTConfig(
        input_size=input_size, in_channels=proj[1], patch_size=proj[2], hidden_size=hidden_size,
        depth=_block_count(state, "shared_blocks") + aux, num_heads=hidden_size // head_dim,
        num_classes=_shape(state, "y_embedder.embedding_table.weight", 2)[0] - 1, aux_head_depth=aux,
        mlp_ratio=mlp_ratio, num_class_tokens=_shape(state, "class_tokens", 2)[0],
        num_cfg_tokens=_shape(state, "omega_tokens", 2)[0], num_interval_tokens=_shape(state, "t_min_tokens", 2)[0],
        num_time_tokens=_shape(state, "time_tokens", 2)[0], auxiliary_head=False,
        frequency_size=_shape(state, "h_embedder.mlp.0.weight", 2)[1],
    )


def preset_of(config: ImfDiTConfig) -> Optional[str]:
    """The name of the preset whose released layout (``auxiliary_head=False``) is ``config``, or None."""
    return next((name for name in IMF_DIT_PRESETS if imf_dit_preset(name, auxiliary_head=False) == config), None)


def check_strict(state: dict[str, Tensor], config: ImfDiTConfig, layout: str) -> None:
    """Refuse weights that are not exactly those of ``ImfDiT(config)``, naming the first keys of
    each difference with their shapes (``layout`` names the config in the message)."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost for XL/2
        expected = {key: tuple(value.shape) for key, value in ImfDiT(config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(key for key in set(expected) & set(state) if tuple(state[key].shape) != expected[key])
    if not (missing or unexpected or mismatched):
        return

    def first(keys: list[str], describe) -> str:
        return ", ".join(describe(key) for key in keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")

    parts = []
    if missing:
        parts.append(f"missing {first(missing, lambda k: f'{k} {expected[k]}')}")
    if unexpected:
        parts.append(f"unexpected {first(unexpected, lambda k: f'{k} {tuple(state[k].shape)}')}")
    if mismatched:
        parts.append("of another shape " + first(
            mismatched, lambda k: f"{k} {tuple(state[k].shape)} (expected {expected[k]})"))
    raise ValueError(f"the file's weights (renamed: 'net.', '._flax_linear', '._flax_embedding' removed) are not "
                     f"those of {layout}: {'; '.join(parts)}")


def build_run_record(config: ImfDiTConfig, omega: float, interval: tuple, extra: dict):
    """The :class:`~meanflow.run_record.RunRecord` of a converted file: ImageNet 256 latents with
    the official normalisation, the ``imf`` objective's defaults, the paper's optimiser, weights "raw"."""
    from ..config import (
        Config,
        DataConfig,
        ModelSpec,
        ObjectiveConfig,
        OptimConfig,
        TrainingConfig,
    )
    from ..encoders import LatentEncoder
    from ..run_record import RunRecord
    from ..samplers import ImfSampler

    if config.in_channels != len(IMF_LATENT_MEAN):
        raise ValueError(f"the file's network has {config.in_channels} input channels; the official latent "
                         f"normalisation (SD-VAE) has {len(IMF_LATENT_MEAN)}")
    run_config = Config(
        data=DataConfig(name="latents"),
        model=ModelSpec("imf_dit", config.to_dict()),
        objective=ObjectiveConfig("imf"),
        optim=OptimConfig(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=0),
        training=TrainingConfig(batch_size=256, ema_decays=(0.9999,)),
        note=f"converted from the official Improved MeanFlow weights ({SOURCE_FORMAT}); weights 'raw'",
    )
    data = run_config.to_dict()
    encoder = LatentEncoder((config.in_channels, config.input_size, config.input_size), vae=OFFICIAL_VAE,
                            downsampling=8, latent_mean=IMF_LATENT_MEAN, latent_std=IMF_LATENT_STD)
    return RunRecord(config=data, model=data["model"], encoder=encoder.to_dict(), objective=data["objective"],
                     sampler=ImfSampler(omega, interval).to_dict(), num_classes=config.num_classes, ema_names=(),
                     extra=extra)


def _check_output(output: Path) -> Path:
    """``output/checkpoints`` may hold nothing but an earlier conversion (which is replaced)."""
    from ..checkpoint import list_checkpoints
    from ..run_record import RunRecord

    root = output / "checkpoints"
    if not root.is_dir():
        return root
    for folder in list_checkpoints(root):
        try:
            converted = SOURCE_FORMAT == RunRecord.load(folder).extra.get("converted_from", {}).get("format")
        except ValueError:
            converted = False
        if not converted or folder.name != "step_000000000":
            raise ValueError(f"{output} already holds the checkpoints of another run ({folder}); give an empty or "
                             f"new folder as --output")
    return root


def convert_imf_details(path: str | Path, output: str | Path, preset: Optional[str] = None,
                        input_size: int = 32) -> Conversion:
    """Convert an official file into the run folder ``output``; returns what was written.

    ``preset`` (``iMF-B/2`` ...) fixes the layout; None reads it from the shapes (any layout,
    also a non-preset one). ``input_size`` is the latent side (not stored in the weights).
    Raises a ValueError for a refused file, for weights that do not match exactly, or for an
    ``output`` that holds another run's checkpoints.
    """
    from ..checkpoint import save_checkpoint
    from ..run_record import RUN_FILE

    path, output = Path(path).expanduser(), Path(output).expanduser()
    if preset is not None and preset not in IMF_DIT_PRESETS:
        raise ValueError(f"unknown iMF preset {preset!r}; valid presets are {sorted(IMF_DIT_PRESETS)}")
    root = _check_output(output)
    raw, nesting = read_official_file(path)
    weights, dropped = split_dropped(rename_official(raw))
    if preset is None:
        config = infer_config(weights, input_size)
        name = preset_of(config)
        layout = name or "the layout inferred from the file's shapes"
    else:
        config = dataclasses.replace(imf_dit_preset(preset, auxiliary_head=False), input_size=input_size)
        name, layout = preset, f"{preset} (auxiliary_head=False, the released layout)"
    check_strict(weights, config, layout)
    omega, interval = ONE_NFE_GUIDANCE.get(name, DEFAULT_GUIDANCE)
    extra = {"converted_from": {"format": SOURCE_FORMAT, "file": str(path), "preset": name,
                                "nesting_key": nesting, "dropped": dropped}}
    record = build_run_record(config, omega, interval, extra)
    checkpoint = save_checkpoint(root, 0, weights, {}, ({}, {"param_groups": [], "scalars": {}}), {},
                                 keep_last=1, files={RUN_FILE: record.to_json()})
    return Conversion(run=output, checkpoint=checkpoint, preset=name, config=config, nesting_key=nesting,
                      tensors=len(weights), dropped=dropped, omega=omega, interval=tuple(interval))


def convert_imf_torch(path: str | Path, output: str | Path, preset: Optional[str] = None) -> Path:
    """Convert an official ``iMF-*.pth`` file into the run folder ``output``; returns ``output``.

    Sample it with ``meanflow sample --checkpoint OUTPUT --weights raw``. See
    :func:`convert_imf_details` for the arguments and errors.
    """
    return convert_imf_details(path, output, preset).run


__all__ = [
    "ONE_NFE_GUIDANCE",
    "Conversion",
    "check_strict",
    "convert_imf_details",
    "convert_imf_torch",
    "infer_config",
    "preset_of",
    "read_official_file",
    "rename_official",
    "split_dropped",
]
