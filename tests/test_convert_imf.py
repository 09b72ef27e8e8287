"""Tests of ``meanflow convert --from imf-torch``: synthetic files with the official key names."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from meanflow.checkpoint import list_checkpoints, load_tensors
from meanflow.cli import main
from meanflow.conditions import Conditions
from meanflow.converters import convert_imf_torch
from meanflow.converters.imf_torch import (
    ONE_NFE_GUIDANCE,
    check_strict,
    convert_imf_details,
    infer_config,
    preset_of,
    rename_official,
    split_dropped,
)
from meanflow.inference import load_model
from meanflow.models.imf_dit import ImfDiT, ImfDiTConfig, imf_dit_preset
from meanflow.run_record import RunRecord

# The official state-dict keys of iMeanFlow(eval=True) (docs/imf.md; the torch branch's
# models/imfDiT.py), as patterns: H hidden, hd head width, M MLP width, P = p * p * C, F the
# sinusoid frequencies, K the label rows, kc / ko / ki / kt the token counts, p and C the patch.
TOP = {
    "net.class_tokens": ("kc", "H"), "net.omega_tokens": ("ko", "H"), "net.time_tokens": ("kt", "H"),
    "net.t_min_tokens": ("ki", "H"), "net.t_max_tokens": ("ki", "H"),
    "net.x_embedder.proj.weight": ("H", "C", "p", "p"), "net.x_embedder.proj.bias": ("H",),
    "net.y_embedder.embedding_table._flax_embedding.weight": ("K", "H"),
    **{f"net.{name}_embedder.mlp.{index}._flax_linear.{part}": shape
       for name in ("h", "omega", "cfg_t_start", "cfg_t_end")
       for index, part, shape in ((0, "weight", ("H", "F")), (0, "bias", ("H",)), (2, "weight", ("H", "H")),
                                  (2, "bias", ("H",)))},
    **{f"net.{head}_final_layer.{part}": shape for head in ("u", "v")
       for part, shape in (("norm.weight", ("H",)), ("linear._flax_linear.weight", ("P", "H")),
                           ("linear._flax_linear.bias", ("P",)))},
}
BLOCK = {
    "attn_scale": ("H",), "mlp_scale": ("H",), "norm1.weight": ("H",), "norm2.weight": ("H",),
    **{f"attn.{name}_proj._flax_linear.weight": ("H", "H") for name in ("q", "k", "v", "out")},
    "attn.q_norm.weight": ("hd",), "attn.k_norm.weight": ("hd",),
    "mlp.w1._flax_linear.weight": ("M", "H"), "mlp.w3._flax_linear.weight": ("M", "H"),
    "mlp.w2._flax_linear.weight": ("H", "M"),
}
# Tiny: H 32, depth 3 (2 shared + 1 u-head block), 2 heads, 4 latent channels on an 8x8 grid, 5 classes.
TINY = dict(H=32, hd=16, M=int(32 * 8 / 3), p=2, C=4, P=16, F=256, K=6, kc=8, ko=4, ki=2, kt=4)
TINY_CONFIG = ImfDiTConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=3, num_heads=2,
                           num_classes=5, aux_head_depth=1, auxiliary_head=False)


def official_shapes(sizes: dict, shared: int, aux: int, v_heads: int = 0) -> dict[str, tuple]:
    """Every official key and its shape for the sizes and block counts."""
    shapes = {key: tuple(sizes[d] for d in dims) for key, dims in TOP.items()}
    for group, count in (("shared_blocks", shared), ("u_heads", aux), ("v_heads", v_heads)):
        for index in range(count):
            shapes.update({f"net.{group}.{index}.{key}": tuple(sizes[d] for d in dims) for key, dims in BLOCK.items()})
    return shapes


def official_state(sizes=TINY, shared=2, aux=1, v_heads=0, seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) * 0.2
            for key, shape in official_shapes(sizes, shared, aux, v_heads).items()}


def write(tmp_path, state, name="iMF-tiny.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def convert(tmp_path, state, **kwargs):
    return convert_imf_details(write(tmp_path, state), tmp_path / "run", input_size=8, **kwargs)


def test_round_trip_and_forward_equal_native_model(tmp_path):
    state = official_state()
    done = convert(tmp_path, state)
    assert done.preset is None and done.config == TINY_CONFIG and done.dropped == {}
    [checkpoint] = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert checkpoint.name == "step_000000000"
    stored = load_tensors(checkpoint / "model.safetensors")
    expected = {re.sub(r"\._flax_(linear|embedding)", "", key[len("net."):]): value for key, value in state.items()}
    assert stored.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(stored[key], value), key
    assert load_tensors(checkpoint / "ema.safetensors") == {}
    assert load_tensors(checkpoint / "optimizer.safetensors") == {}

    loaded = load_model(tmp_path / "run", weights="raw")
    native = ImfDiT(TINY_CONFIG)
    native.load_state_dict(rename_official(state))
    generator = torch.Generator().manual_seed(1)
    z, r, t = torch.randn(3, 4, 8, 8, generator=generator), torch.tensor([0.0, 0.2, 0.5]), torch.tensor([1.0, 0.7, 0.5])
    conditions = Conditions(labels=torch.tensor([0, 4, 5]), guidance_scale=torch.tensor([1.0, 8.0, 2.5]),
                            guidance_interval=torch.tensor([[0.0, 1.0], [0.4, 0.65], [0.1, 0.9]]))
    with torch.no_grad():
        ours, theirs = loaded.model(z, r, t, conditions).u, native.eval()(z, r, t, conditions).u
    assert torch.equal(ours, theirs) and ours.abs().sum() > 0


def test_run_record(tmp_path):
    run = convert_imf_torch(write(tmp_path, official_state()), tmp_path / "run")  # the public API: input_size 32
    assert run == tmp_path / "run"
    record = RunRecord.load(tmp_path / "run" / "checkpoints" / "step_000000000")
    from meanflow.config import Config

    config = Config.from_dict(record.config)
    assert config.data.name == "latents" and config.data.path is None
    assert config.model.architecture == "imf_dit" and config.model.options["auxiliary_head"] is False
    assert config.objective.method == "imf" and config.optim.lr == 1e-4 and config.optim.betas == (0.9, 0.95)
    assert record.ema_names == () and record.num_classes == 5
    assert record.encoder["sample_shape"] == [4, 32, 32]
    assert record.encoder["latent_mean"] == [0.86488, -0.27787343, 0.21616915, 0.3738409]
    assert record.encoder["latent_std"] == [4.85503674, 5.31922414, 3.93725398, 3.9870003]
    assert record.encoder["vae"] == "stabilityai/sd-vae-ft-mse" and record.encoder["downsampling"] == 8
    assert record.build_sampler().omega == 8.0 and record.build_sampler().interval == (0.40, 0.65)


@pytest.mark.parametrize("name", ["iMF-B/2", "iMF-M/2", "iMF-L/2", "iMF-XL/2"])
def test_preset_inferred_from_shapes(name):
    """The released layout of each preset, as meta tensors (shapes only), with a training file's v_heads."""
    preset = imf_dit_preset(name)
    sizes = dict(TINY, H=preset.hidden_size, hd=preset.hidden_size // preset.num_heads,
                 M=int(preset.hidden_size * 8 / 3), K=1001)
    shapes = official_shapes(sizes, preset.depth - 8, 8, v_heads=8)
    state = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    weights, dropped = split_dropped(rename_official(state))
    assert dropped == {"v_heads.*: the auxiliary v head's blocks, used only in training": 8 * len(BLOCK)}
    config = infer_config(weights)
    assert preset_of(config) == name and config == imf_dit_preset(name, auxiliary_head=False)
    check_strict(weights, config, name)  # no error
    assert ONE_NFE_GUIDANCE[name] == {"iMF-B/2": (8.0, (0.40, 0.65)), "iMF-M/2": (10.5, (0.40, 0.60)),
                                      "iMF-L/2": (10.5, (0.40, 0.60)), "iMF-XL/2": (8.0, (0.42, 0.62))}[name]


def test_nested_training_file(tmp_path):
    """Weights nested under "model", with the v head's blocks and a RoPE table: both dropped and reported."""
    state = dict(official_state(v_heads=1), **{"net.rope_freqs": torch.zeros(36, 8)})
    path = tmp_path / "nested.pth"
    torch.save({"model": state}, path)
    done = convert_imf_details(path, tmp_path / "run", input_size=8)
    assert done.nesting_key == "model" and done.config == TINY_CONFIG
    assert done.dropped == {"v_heads.*: the auxiliary v head's blocks, used only in training": len(BLOCK),
                            "the RoPE table, rebuilt from the config": 1}


def _error(tmp_path, capsys, state_or_path, *extra):
    path = state_or_path if not isinstance(state_or_path, dict) else write(tmp_path, state_or_path)
    code = main(["convert", "--from", "imf-torch", str(path), "--output", str(tmp_path / "out"), "--input-size", "8",
                 *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "checkpoints").exists() or not list_checkpoints(tmp_path / "out" / "checkpoints")
    return err


def test_missing_unexpected_and_wrong_shape(tmp_path, capsys):
    state = official_state()
    del state["net.u_heads.0.mlp.w2._flax_linear.weight"]
    assert "missing u_heads.0.mlp.w2.weight (32, 85)" in _error(tmp_path, capsys, state)
    state = dict(official_state(), **{"net.extra_head.weight": torch.zeros(3)})
    assert "unexpected extra_head.weight (3,)" in _error(tmp_path, capsys, state)
    state = official_state()
    state["net.u_final_layer.linear._flax_linear.bias"] = torch.zeros(12)
    assert "u_final_layer.linear.bias (12,) (expected (16,))" in _error(tmp_path, capsys, state)
    err = _error(tmp_path, capsys, official_state(), "--preset", "iMF-B/2")
    assert "not those of iMF-B/2" in err and "of another shape cfg_t_end_embedder.mlp.0.bias (32,) (expected (768,))" in err


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_refused_files(tmp_path, capsys):
    marker = tmp_path / "ran"
    pickled = tmp_path / "code.pth"
    torch.save({"net.class_tokens": torch.zeros(8, 32), "payload": Payload(marker)}, pickled)
    assert not marker.exists()  # torch.save pickled the call without making it; no load may make it
    err = _error(tmp_path, capsys, pickled)
    assert "is refused" in err and "weights_only=False" not in err and not marker.exists()
    assert "not a dict of tensors: 1 of its 2 entries" in _error(
        tmp_path, capsys, {"net.class_tokens": torch.zeros(8, 32), "step": 3})
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listed)
    assert "holds a list, not a state dict" in _error(tmp_path, capsys, listed)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file at all")
    assert "is refused" in _error(tmp_path, capsys, garbage)
    assert "no such file" in _error(tmp_path, capsys, tmp_path / "absent.pth")
    assert "unknown iMF preset" in _error(tmp_path, capsys, official_state(), "--preset", "iMF-S/2")


def test_output_of_another_run_refused(tmp_path, capsys):
    convert(tmp_path, official_state())
    convert(tmp_path, official_state(seed=1))  # an earlier conversion is replaced
    assert torch.equal(load_tensors(tmp_path / "run" / "checkpoints" / "step_000000000" / "model.safetensors")[
        "class_tokens"], rename_official(official_state(seed=1))["class_tokens"])
    record = tmp_path / "run" / "checkpoints" / "step_000000000" / "run.json"
    data = json.loads(record.read_text())
    data.pop("extra")
    record.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="already holds the checkpoints of another run"):
        convert(tmp_path, official_state())


def test_cli_convert_then_sample(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    path = write(tmp_path, official_state())
    run = tmp_path / "run"
    assert main(["convert", "--from", "imf-torch", str(path), "--output", str(run), "--input-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "layout:      inferred from the shapes" in out and "dropped:     nothing" in out
    assert f"meanflow sample --checkpoint {run} --weights raw" in out
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    samples = tmp_path / "s.npz"
    code = main(["sample", "--checkpoint", str(run), "--weights", "raw", "--num-samples", "4", "--vae",
                 str(tmp_path / "vae"), "--output", str(samples), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    with np.load(samples) as data:
        # The tiny VAE halves, so 8x8 latents decode to 16x16 images; the record's downsampling 8
        # (the SD-VAE's) is not what decoding uses, so a VAE given by --vae works as is.
        assert data["arr_0"].shape == (4, 16, 16, 3) and data["arr_0"].dtype == np.uint8
        assert data["arr_0"].std() > 0 and data["arr_1"].tolist() == [0, 1, 2, 3]
