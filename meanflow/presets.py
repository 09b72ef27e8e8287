"""Named run configurations. ``meanflow train --preset NAME`` starts from one of these."""

from __future__ import annotations

import math
from typing import Callable

from .config import Config, DataConfig, ModelSpec, ObjectiveConfig, OptimConfig, TrainingConfig
from .toys import ToyDistribution


def _meanflow(**settings) -> ObjectiveConfig:
    """A MeanFlow objective with these settings (the rest at MeanFlow's defaults)."""
    return ObjectiveConfig("meanflow", settings)


def digits() -> Config:
    """Class-conditional 8x8 digits with guidance in the target: the demo, minutes on a laptop CPU."""
    return Config(
        data=DataConfig(name="digits"),
        model=ModelSpec("dit", dict(input_size=8, in_channels=1, patch_size=2, hidden_size=64, depth=4,
                                    num_heads=4, num_classes=10, frequency_size=64)),
        # omega' = omega / (1 - kappa) = 2.0, the B/2 setting of the paper.
        objective=_meanflow(fraction_r_neq_t=0.25, omega=1.0, kappa=0.5, class_dropout=0.1),
        optim=OptimConfig(lr=1e-3, warmup_steps=100),
        # Short EMA horizons: over ~1500 steps at lr 1e-3 a 0.999 average still mixes in early,
        # very different weights (its samples came out as the wrong classes).
        training=TrainingConfig(steps=1500, batch_size=128, ema_decays=(0.99, 0.995), log_every=50,
                                checkpoint_every=1000, grid_samples=100, grid_steps=(1, 2)),
        note="scikit-learn's 8x8 digits, class-conditional, CFG in training (omega'=2). No paper number.",
    )


def toy(name: str) -> Callable[[], Config]:
    def build() -> Config:
        return Config(
            data=DataConfig(name="toy", toy=name, class_conditional=False),
            model=ModelSpec("mlp", dict(data_dim=2, hidden_size=256, depth=4)),
            # p = 0: the plain squared error. In 2-D the errors are not heavy-tailed, and the paper's
            # p = 1 (made for images) flattens the loss so much that 1-NFE samples stay blurred:
            # checkerboard energy distance 0.0081 with p = 1, 0.0017 with p = 0.5, 0.0012 with p = 0
            # (benchmarks/toy_quality.py budget, one seed).
            objective=_meanflow(fraction_r_neq_t=0.75, mu=-0.4, sigma=1.0, p=0.0, c=0.01),
            optim=OptimConfig(lr=1e-3, warmup_steps=100),
            training=TrainingConfig(steps=3000, batch_size=512, ema_decays=(0.999,), log_every=100,
                                    checkpoint_every=1000, grid_samples=2000, grid_steps=(1, 2)),
            note=f"2-D toy '{name}', unconditional MLP. No paper number.",
        )

    build.__doc__ = f"The 2-D toy distribution '{name}' with an MLP."
    return build


def toy_imf(name: str) -> Callable[[], Config]:
    """Improved MeanFlow on the 2-D toy ``name`` with a two-head, guidance-conditioned MLP."""

    def build() -> Config:
        config = toy(name)()
        # Unconditional data: no class to guide towards, so v_g = v; the network still takes omega and
        # the interval (as the dropped rows of a class-conditional run do) and trains its v head.
        # p = 0 for the 2-D toys (see toy()); the rest are the official iMF defaults.
        return Config(
            data=config.data,
            model=ModelSpec("mlp", dict(data_dim=2, hidden_size=256, depth=4, guidance_conditions=True,
                                        auxiliary_velocity=True)),
            objective=ObjectiveConfig("imf", dict(fraction_r_neq_t=0.5, mu=-0.4, sigma=1.0, p=0.0, c=0.01)),
            optim=config.optim,
            training=config.training,
            note=f"2-D toy '{name}', Improved MeanFlow (two-head MLP, unconditional). No paper number.",
        )

    build.__doc__ = f"Improved MeanFlow on the 2-D toy '{name}' with a two-head MLP."
    return build


def _imf(**settings) -> ObjectiveConfig:
    """An Improved MeanFlow objective with these settings (the rest at the official defaults)."""
    return ObjectiveConfig("imf", settings)


def _small_imf_dit(input_size: int, patch_size: int, hidden_size: int, depth: int, aux_head_depth: int) -> ModelSpec:
    """A small class-conditional imfDiT on 1-channel images (10 classes), v head built for training."""
    return ModelSpec("imf_dit", dict(input_size=input_size, in_channels=1, patch_size=patch_size,
                                     hidden_size=hidden_size, depth=depth, num_heads=4, num_classes=10,
                                     aux_head_depth=aux_head_depth, frequency_size=hidden_size))


def _imf_on(base: Callable[[], Config], label: str, **network) -> Callable[[], Config]:
    """Improved MeanFlow on the data, optimiser and budget of the MeanFlow preset ``base``.

    The objective takes the official settings (ImfSettings' defaults): omega log-uniform in
    [1, 8], half the rows r = t, a guidance interval drawn per row; guidance is a network input,
    picked at sampling with --omega / --interval.
    """

    def build() -> Config:
        config = base()
        return Config(data=config.data, model=_small_imf_dit(**network), objective=_imf(), optim=config.optim, training=config.training,
                      note=f"{label}, class-conditional, Improved MeanFlow (small imfDiT, guidance as an input; pick "
                           "it at sampling with --omega / --interval). No paper number.")

    build.__doc__ = f"Improved MeanFlow on {label} with a small class-conditional imfDiT."
    return build



def _image_dit(name: str, label: str) -> Callable[[], Config]:
    def build() -> Config:
        return Config(
            data=DataConfig(name=name),
            # 28x28 with patch 4: 49 tokens; ~0.9M parameters, about 0.6 s a step on 2 CPU cores.
            model=ModelSpec("dit", dict(input_size=28, in_channels=1, patch_size=4, hidden_size=128, depth=4,
                                        num_heads=4, num_classes=10, frequency_size=128)),
            objective=_meanflow(fraction_r_neq_t=0.25, omega=1.0, kappa=0.5, class_dropout=0.1),
            optim=OptimConfig(lr=1e-3, warmup_steps=200),
            training=TrainingConfig(steps=20000, batch_size=128, ema_decays=(0.99, 0.999), log_every=100,
                                    checkpoint_every=2000, grid_samples=100, grid_steps=(1, 2)),
            note=f"{label}, class-conditional DiT (patch 4), CFG in training (omega'=2). No paper number.",
        )

    build.__doc__ = f"Class-conditional {label} with a small DiT."
    return build


# The paper's ImageNet 256 recipes (spec section 7): SD-VAE latents 32x32x4, Adam (0.9, 0.95),
# constant lr 1e-4, batch 256, EMA 0.9999, fp32, class dropout 0.1, 25% r != t, LN(-0.4, 1.0),
# p = 1, c = 0.01; per-model guidance (omega, kappa, interval).
_IMAGENET_STEPS_PER_EPOCH = 1_281_167 // 256


def _imagenet(model: str, epochs: int, omega: float, kappa: float, t_min: float, t_max: float, fid: str):
    def build() -> Config:
        from .models.dit import dit_preset

        return Config(
            data=DataConfig(name="latents", path=None, horizontal_flip=True),
            model=ModelSpec("dit", dit_preset(model).to_dict()),
            objective=_meanflow(mu=-0.4, sigma=1.0, fraction_r_neq_t=0.25, p=1.0, c=0.01, omega=omega,
                                      kappa=kappa, t_min=t_min, t_max=t_max, class_dropout=0.1),
            optim=OptimConfig(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=0),
            training=TrainingConfig(steps=epochs * _IMAGENET_STEPS_PER_EPOCH, batch_size=256, ema_decays=(0.9999,),
                                    log_every=100, checkpoint_every=5000, milestone_every=50_000, grid_samples=64,
                                    grid_steps=(1, 2), sample_every=10_000, precision="fp32"),
            note=f"ImageNet 256 (SD-VAE latents; set data.path to a cache from `meanflow encode`), {model}, "
                 f"{epochs} epochs, omega'={omega / (1 - kappa):g} (omega={omega}, kappa={kappa}, "
                 f"t in [{t_min}, {t_max}]). Paper: {fid}.",
        )

    build.__doc__ = f"The paper's ImageNet 256 recipe for {model}."
    return build


# The official iMF ImageNet 256 recipe (Lyy-iiis/imeanflow, `main`: configs/default.py, overridden by
# configs/train_config.yml): AdamW with weight decay 0 (utils/trainstate_util.py l. 65-69; optax's
# b1 0.9), b2 0.95 (train_config.yml l. 17), lr 1e-4 (l. 14) after a linear warm-up of 10 epochs
# (l. 15), then constant ("warmup_const", default.py l. 47; utils/lr_utils.py), global batch 1024
# (train_config.yml l. 13), 640 epochs (l. 12), one constant EMA of 0.9999 (l. 18; default.py
# l. 45), fp32 (default.py l. 40), flips on (utils/input_pipeline.py l. 119), the last incomplete
# batch dropped (l. 132). The objective is ImfSettings' defaults (its docstring cites imf.py).
_IMF_IMAGENET_BATCH = 1024
_IMF_IMAGENET_STEPS_PER_EPOCH = 1_281_167 // _IMF_IMAGENET_BATCH  # 1251
_IMF_IMAGENET_EPOCHS = 640
_IMF_IMAGENET_WARMUP_EPOCHS = 10


def _imagenet_imf(model: str, omega: float, interval: tuple, fid: str) -> Callable[[], Config]:
    def build() -> Config:
        from .models.imf_dit import imf_dit_preset

        t_min, t_max = interval
        return Config(
            data=DataConfig(name="latents", path=None, horizontal_flip=True, latent_normalisation="imf_channels"),
            model=ModelSpec("imf_dit", imf_dit_preset(model, auxiliary_head=True).to_dict()),
            objective=_imf(mu=-0.4, sigma=1.0, fraction_r_neq_t=0.5, s_max=7.0, beta=1.0, t_min_low=0.0,
                           t_min_high=0.5, t_max_low=0.5, t_max_high=1.0, class_dropout=0.1, p=1.0, c=0.01,
                           auxiliary_weight=1.0, sample_omega=omega, sample_interval=[t_min, t_max]),
            optim=OptimConfig(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0,
                              warmup_steps=_IMF_IMAGENET_WARMUP_EPOCHS * _IMF_IMAGENET_STEPS_PER_EPOCH,
                              decay="constant"),
            training=TrainingConfig(steps=_IMF_IMAGENET_EPOCHS * _IMF_IMAGENET_STEPS_PER_EPOCH,
                                    batch_size=_IMF_IMAGENET_BATCH, ema_decays=(0.9999,), log_every=100,
                                    checkpoint_every=5000, milestone_every=50_000, grid_samples=64,
                                    grid_steps=(1, 2), sample_every=10_000, precision="fp32"),
            # The run's sampler samples at the authors' 1-NFE setting; --omega / --interval pick others.
            note=f"ImageNet 256 (SD-VAE latents normalised per channel; set data.path to a cache from `meanflow "
                 f"encode`), {model}, Improved MeanFlow, {_IMF_IMAGENET_EPOCHS} epochs at batch "
                 f"{_IMF_IMAGENET_BATCH}. Samples by default at the authors' 1-NFE setting omega {omega:g}, interval [{t_min:g}, {t_max:g}]. "
                 f"Paper: {fid}.",
        )

    build.__doc__ = f"The official Improved MeanFlow ImageNet 256 recipe for {model}."
    return build


def cifar10() -> Config:
    """The paper's CIFAR-10 recipe (unconditional U-Net in pixel space, spec section 7)."""
    return Config(
        data=DataConfig(name="cifar10", horizontal_flip=True, class_conditional=False),
        model=ModelSpec("unet", dict(input_size=32, in_channels=3, base_channels=128, channel_multipliers=[2, 2, 2],
                                     num_res_blocks=4, attention_resolutions=[16], dropout=0.2, num_classes=None)),
        # t, r ~ LN(-2.0, 2.0) sorted; r = t with probability 0.25.
        objective=_meanflow(mu=-2.0, sigma=2.0, fraction_r_neq_t=0.75, p=0.75, c=1e-3),
        # Linear warmup: its length is not stated by the paper; 10k steps is our choice.
        optim=OptimConfig(lr=6e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=10_000),
        training=TrainingConfig(steps=800_000, batch_size=1024, ema_decays=(0.9999, 0.99995, 0.9996),
                                log_every=100, checkpoint_every=5000, milestone_every=100_000, grid_samples=64,
                                grid_steps=(1, 2), sample_every=20_000),
        note="CIFAR-10 unconditional, U-Net ~56M. Paper: 1-NFE FID 2.92 (the authors' port: 2.80 with EMA "
             "0.99995).",
    )


PRESETS: dict[str, Callable[[], Config]] = {
    "digits": digits,
    "mnist": _image_dit("mnist", "MNIST"),
    "fashion-mnist": _image_dit("fashion-mnist", "Fashion-MNIST"),
    "cifar10": cifar10,
    "imagenet256-b4": _imagenet("DiT-B/4", 80, 1.0, 0.0, 0.0, 1.0,
                                "1-NFE FID 61.06 without guidance (15.53 with omega=3: --set objective.omega=3)"),
    "imagenet256-b2": _imagenet("DiT-B/2", 240, 1.0, 0.5, 0.0, 1.0, "1-NFE FID 6.17"),
    "imagenet256-m2": _imagenet("DiT-M/2", 240, 1.0, 0.5, 0.0, 1.0, "1-NFE FID 5.01"),
    "imagenet256-l2": _imagenet("DiT-L/2", 240, 0.2, 0.92, 0.0, 0.8, "1-NFE FID 3.84"),
    "imagenet256-xl2": _imagenet("DiT-XL/2", 240, 0.2, 0.92, 0.0, 0.75, "1-NFE FID 3.43, 2-NFE FID 2.93"),
    "imagenet256-xl2-plus": _imagenet("DiT-XL/2", 1000, 1.0, 0.5, 0.3, 0.8, "2-NFE FID 2.20"),
}
PRESETS.update({
    # FIDs: FAMILY.md F1 (the paper); the official README's table gives the same to +-0.02.
    "imagenet256-imf-b2": _imagenet_imf("iMF-B/2", 8.0, (0.40, 0.65), "1-NFE FID 3.39"),
    "imagenet256-imf-m2": _imagenet_imf("iMF-M/2", 10.5, (0.40, 0.60), "1-NFE FID 2.27"),
    "imagenet256-imf-l2": _imagenet_imf("iMF-L/2", 10.5, (0.40, 0.60), "1-NFE FID 1.86"),
    "imagenet256-imf-xl2": _imagenet_imf("iMF-XL/2", 8.0, (0.42, 0.62),
                                         "1-NFE FID 1.72; 2-NFE FID 1.54 with --omega 4 --interval 0.36,0.64"),
    # 16 (digits) / 49 (MNIST) patch tokens + 20 conditioning tokens; a trunk of 2 blocks, then u
    # and v heads of 2 blocks each.
    "imf-digits": _imf_on(digits, "scikit-learn's 8x8 digits", input_size=8, patch_size=2, hidden_size=64, depth=4,
                          aux_head_depth=2),
    "imf-mnist": _imf_on(_image_dit("mnist", "MNIST"), "MNIST", input_size=28, patch_size=4, hidden_size=128,
                         depth=4, aux_head_depth=2),
})
PRESETS.update({f"toy-{d.value.replace('_', '-')}": toy(d.value) for d in ToyDistribution})
PRESETS.update({f"toy-{d.value.replace('_', '-')}-imf": toy_imf(d.value) for d in ToyDistribution})


# ----------------------------------------------- Shortcut models (FAMILY.md F3) and SplitMeanFlow (F4)

def _on(base: Callable[[], Config], objective: ObjectiveConfig, note: str) -> Callable[[], Config]:
    """``objective`` on the data, network, optimiser and budget of the preset ``base``."""

    def build() -> Config:
        config = base()
        return Config(data=config.data, model=config.model, objective=objective, optim=config.optim,
                      training=config.training, note=note)

    build.__doc__ = note
    return build


# Shortcut on class-conditional images: CFG 1.5 in the finest bootstrap target, as the official
# ImageNet recipe (objective.shortcut.guidance_scale; the other settings are ShortcutSettings' defaults).
_SHORTCUT_CONDITIONAL = ObjectiveConfig("shortcut", dict(guidance_scale=1.5, class_dropout=0.1))
# SplitMeanFlow on the MeanFlow presets' settings (25% r != t, omega' = 2 at the boundary).
_SPLIT_CONDITIONAL = ObjectiveConfig("split_meanflow", dict(fraction_r_neq_t=0.25, omega=1.0, kappa=0.5,
                                                            class_dropout=0.1))
# The 2-D toys: p = 0 as every toy preset (see toy()); MeanFlow's toy time law for SplitMeanFlow.
_SHORTCUT_TOY = ObjectiveConfig("shortcut", dict(p=0.0))
_SPLIT_TOY = ObjectiveConfig("split_meanflow", dict(fraction_r_neq_t=0.75, mu=-0.4, sigma=1.0, p=0.0, c=0.01))

# The official Shortcut recipes (kvfrans/shortcut-models README and train.py): AdamW lr 1e-4, betas
# (0.9, 0.999), weight decay 0.1, no warm-up, constant (train.py lines 40-45, 146-152); EMA 0.999
# (``target_update_rate``, line 56); the DiT in bf16 (model.py line 234); random flips
# (utils/datasets.py lines 20, 43); SD-VAE latents (``use_stable_vae``, line 58).
_SHORTCUT_OPTIM = OptimConfig(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1, warmup_steps=0, decay="constant")


def _shortcut_paper(model: str, conditional: bool, steps: int, batch_size: int, label: str,
                    fid: str) -> Callable[[], Config]:
    def build() -> Config:
        from .models.dit import dit_preset

        network = dit_preset(model) if conditional else dit_preset(model, num_classes=None)
        # ImageNet: --model.cfg_scale 1.5 --model.class_dropout_prob 0.1 --model.bootstrap_cfg 1;
        # CelebA-HQ: cfg_scale 0 (every label null: unconditional).
        settings = dict(guidance_scale=1.5, class_dropout=0.1) if conditional else dict(guidance_scale=1.0)
        return Config(
            data=DataConfig(name="latents", path=None, horizontal_flip=True, class_conditional=conditional),
            model=ModelSpec("dit", network.to_dict()),
            objective=ObjectiveConfig("shortcut", settings),
            optim=_SHORTCUT_OPTIM,
            training=TrainingConfig(steps=steps, batch_size=batch_size, ema_decays=(0.999,), log_every=100,
                                    checkpoint_every=5000, milestone_every=50_000, grid_samples=64,
                                    grid_steps=(1, 4), sample_every=10_000, precision="bf16"),
            note=f"{label} (SD-VAE latents; set data.path to a cache from `meanflow encode`), {model}, Shortcut "
                 f"models, {steps} steps at batch {batch_size}. Bootstrap targets from the online weights (the "
                 f"official code uses its 0.999 EMA). Paper: {fid} (official README, FID-50k).",
        )

    build.__doc__ = f"The official Shortcut-models recipe for {label} with {model}."
    return build


PRESETS.update({
    "shortcut-digits": _on(digits, _SHORTCUT_CONDITIONAL, "scikit-learn's 8x8 digits, class-conditional, Shortcut "
                           "models (CFG 1.5 in the finest bootstrap target). No paper number."),
    "shortcut-mnist": _on(_image_dit("mnist", "MNIST"), _SHORTCUT_CONDITIONAL,
                          "MNIST, class-conditional DiT (patch 4), Shortcut models (CFG 1.5 in the finest bootstrap "
                          "target). No paper number."),
    "split-meanflow-digits": _on(digits, _SPLIT_CONDITIONAL, "scikit-learn's 8x8 digits, class-conditional, "
                                 "SplitMeanFlow (omega'=2 at the boundary). No paper number."),
    "split-meanflow-mnist": _on(_image_dit("mnist", "MNIST"), _SPLIT_CONDITIONAL,
                                "MNIST, class-conditional DiT (patch 4), SplitMeanFlow (omega'=2 at the boundary). "
                                "No paper number."),
    "imagenet256-shortcut-b2": _shortcut_paper("DiT-B/2", True, 810_000, 256, "ImageNet 256",
                                               "1-NFE FID 40.3, 4-NFE 28.3, 128-NFE 15.5"),
    "imagenet256-shortcut-xl2": _shortcut_paper("DiT-XL/2", True, 810_000, 256, "ImageNet 256",
                                                "1-NFE FID 10.6, 4-NFE 7.8, 128-NFE 3.8"),
    "celebahq256-shortcut-b2": _shortcut_paper("DiT-B/2", False, 410_000, 64, "CelebA-HQ 256, unconditional",
                                               "1-NFE FID 20.5, 4-NFE 13.8, 128-NFE 6.9"),
})
PRESETS.update({f"toy-{d.value.replace('_', '-')}-shortcut": _on(
    toy(d.value), _SHORTCUT_TOY, f"2-D toy '{d.value}', unconditional MLP, Shortcut models. No paper number.")
    for d in ToyDistribution})
PRESETS.update({f"toy-{d.value.replace('_', '-')}-split-meanflow": _on(
    toy(d.value), _SPLIT_TOY, f"2-D toy '{d.value}', unconditional MLP, SplitMeanFlow. No paper number.")
    for d in ToyDistribution})



# --- Consistency training on the flow map (FAMILY.md F5; meanflow/objectives/consistency.py) -------


def _consistency(**settings) -> ObjectiveConfig:
    """Consistency training with these settings (the rest at iCT's defaults)."""
    return ObjectiveConfig("consistency", settings)


def _consistency_on(base: Callable[[], Config], label: str, **settings) -> Callable[[], Config]:
    """Consistency training on the data, network, optimiser and budget of the preset ``base``."""

    def build() -> Config:
        config = base()
        return Config(data=config.data, model=config.model, objective=_consistency(**settings), optim=config.optim,
                      training=config.training,
                      note=f"{label}, consistency training on the flow map f = z - t u(z, 0, t) (iCT's discrete "
                           "curriculum by default). No paper number.")

    build.__doc__ = f"Consistency training (iCT) on {label}, same setup otherwise."
    return build


def _cifar10_consistency(settings: dict, dropout: float, optim: OptimConfig, steps: int, batch_size: int,
                         ema: float, note: str) -> Callable[[], Config]:
    """A consistency-training CIFAR-10 recipe on the MeanFlow CIFAR-10 U-Net (unconditional, flips)."""

    def build() -> Config:
        config = cifar10()
        return Config(
            data=config.data,
            model=ModelSpec("unet", {**config.model.options, "dropout": dropout}),
            objective=_consistency(**settings),
            optim=optim,
            training=TrainingConfig(steps=steps, batch_size=batch_size, ema_decays=(ema,), log_every=100,
                                    checkpoint_every=5000, milestone_every=100_000, grid_samples=64,
                                    grid_steps=(1, 2), sample_every=20_000),
            note=note + " Differs from the paper: the linear path z_t = (1 - t) x + t e (sigma = t / (1 - t)), "
                        "our U-Net (~56M, MeanFlow's CIFAR-10 network) instead of the paper's, AdamW instead of "
                        "RAdam.",
        )

    return build



def toy_consistency(name: str) -> Callable[[], Config]:
    """Consistency training on the 2-D toy ``name`` with the MLP, data, optimiser and budget of toy()."""

    def build() -> Config:
        config = toy(name)()
        return Config(data=config.data, model=config.model, objective=_consistency(**_TOY_CONSISTENCY),
                      optim=config.optim, training=config.training,
                      note=f"2-D toy '{name}', consistency training on the flow map (unconditional MLP). "
                           "No paper number.")

    build.__doc__ = f"Consistency training on the 2-D toy '{name}' with an MLP."
    return build


# iCT's defaults. Checkerboard, toy() budget, one seed, energy distance at 1 / 2 / 4 NFE: iCT 0.0116 / 0.0006 /
# 0.0031, ECT (discretisation='ect') 0.0072 / 0.0000 / 0.0027, continuous 0.0089 / -0.0001 / 0.0019 (MeanFlow's
# toy preset: 0.0009 / 0.0007 / 0.0009).
_TOY_CONSISTENCY: dict = {}

_SIGMA_MID = 0.821  # iCT's and ECT's 2-step noise level (ECT ct_train.py --mid_t)
# sCT's 2-step TrigFlow time 1.1 (our reading of the paper; not in the stored code) as a noise
# level sigma_d tan(1.1), sigma_d = 0.5.
_SCT_SIGMA_MID = 0.5 * math.tan(1.1)
PRESETS.update({
    "consistency-digits": _consistency_on(digits, "scikit-learn's 8x8 digits, class-conditional"),
    "consistency-mnist": _consistency_on(_image_dit("mnist", "MNIST"), "MNIST, class-conditional"),
    "cifar10-ict": _cifar10_consistency(
        dict(mode="discrete", discretisation="ict", p_mean=-1.1, p_std=2.0, sigma_min=0.002, sigma_max=80.0,
             rho=7.0, initial_steps=10, final_steps=1280, distance="pseudo_huber", huber_c=None,
             gap_weighting="sigma_gap", sample_two_step_time=_SIGMA_MID / (1 + _SIGMA_MID)),
        dropout=0.3, optim=OptimConfig(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=0),
        steps=400_000, batch_size=1024, ema=0.99993,
        note="CIFAR-10 unconditional, improved consistency training (iCT: Song & Dhariwal 2023; s0 10, s1 1280, "
             "erf law P_mean -1.1 P_std 2.0, pseudo-Huber c = 0.00054 sqrt(3072), lambda 1/dsigma, no EMA "
             "teacher, dropout 0.3, lr 1e-4, batch 1024, 400k iterations, EMA 0.99993; 2-step sigma 0.821). "
             "Paper: 1-NFE FID 2.83 (NCSN++)."),
    "cifar10-ect": _cifar10_consistency(
        dict(mode="discrete", discretisation="ect", p_mean=-1.1, p_std=2.0, ect_q=2.0, ect_k=8.0, ect_b=1.0,
             ect_stages=8, distance="pseudo_huber", huber_c=0.0, gap_weighting="sigma_gap",
             sample_two_step_time=_SIGMA_MID / (1 + _SIGMA_MID)),
        dropout=0.2, optim=OptimConfig(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=0),
        steps=200_000, batch_size=128, ema=0.9999,
        note="CIFAR-10 unconditional, easy consistency tuning (ECT: Geng et al. 2024; locuslab/ect run_ecm.sh: "
             "25.6 Mimg at batch 128, q 2, k 8, b 1, 8 stages, ||.|| / dsigma, dropout 0.2, lr 1e-4, EMA 0.9999; "
             "2-step sigma 0.821). Paper: 1-NFE FID 3.60, 2-NFE FID 2.11 (DDPM++, tuned from a pretrained EDM; "
             "this preset trains from scratch)."),
    "cifar10-sct": _cifar10_consistency(
        dict(mode="continuous", p_mean=-1.0, p_std=1.4, tangent_normalisation="l2", tangent_c=0.1,
             tangent_warmup=10_000 / 400_000, derivative="two_pass", p=0.0,
             sample_two_step_time=_SCT_SIGMA_MID / (1 + _SCT_SIGMA_MID)),
        dropout=0.2, optim=OptimConfig(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, warmup_steps=0),
        steps=400_000, batch_size=512, ema=0.99993,
        note="CIFAR-10 unconditional, continuous-time consistency training (sCT: Lu & Song 2024; tangent "
             "normalisation c 0.1, warm-up 10k iterations, P_mean -1.0, P_std 1.4, dropout 0.2, betas (0.9, 0.99) "
             "as in NVlabs/FastGen's sCM config; lr 1e-3, batch 512, 400k iterations, EMA 0.99993 and the 2-step "
             "TrigFlow time 1.1 are our reading of the paper, not checked against its code). Paper: 1-NFE FID "
             "2.97, 2-NFE FID 2.06 (TrigFlow, NCSN++ with adaptive double normalisation and a learnt "
             "weighting w(t), not implemented here)."),
})
PRESETS.update({f"toy-{d.value.replace('_', '-')}-consistency": toy_consistency(d.value) for d in ToyDistribution})

# ------------------------------------------------------------------ alpha-Flow (FAMILY.md F2)

def _alpha_flow(**settings) -> ObjectiveConfig:
    """An alpha-Flow objective with these settings (the rest at AlphaFlowSettings' defaults)."""
    return ObjectiveConfig("alpha_flow", settings)


# The MeanFlow presets' settings with the objective swapped: digits / MNIST (25% r != t, omega' = 2),
# the 2-D toys (75% r != t, p = 0: see toy()); the curriculum is the official sigmoid over the run.
_ALPHA_CONDITIONAL = _alpha_flow(fraction_r_neq_t=0.25, omega=1.0, kappa=0.5, class_dropout=0.1)
_ALPHA_TOY = _alpha_flow(fraction_r_neq_t=0.75, mu=-0.4, sigma=1.0, p=0.0, c=0.01)

# The official ImageNet 256 recipes (snap-research/alphaflow, commit b0fef77,
# infra/experiments/experiments-alphaflow.yaml, entries alphaflow-sigmoid-latentspace-B-2,
# -B-2-cfg-training, -XL-2-cfg-training and their bases): Adam betas (0.9, 0.95), weight decay 0,
# constant lr 1e-4, batch 256, SD-VAE latents; alpha: sigmoid from 1 to 0, gamma 25, clamp 0.005;
# r = t on the first rows of each batch ('prefix'). The adaptive weight is 1 / (L_mean + 1e-3), L_mean
# the per-sample mean of squares: with our per-sample sum (Eq. 7) over 4 x 32 x 32 latents that is
# p = 1, c = 1e-3 * 4096. EMA decay, flips and precision are not in the stored configs: MeanFlow's
# ImageNet presets' (0.9999, flips, fp32) are kept. FIDs: the official README (FID-50k).
_ALPHA_IMAGENET = dict(mu=-0.4, sigma=1.0, mask_mode="prefix", p=1.0, c=1e-3 * 4 * 32 * 32, alpha_schedule="sigmoid",
                       alpha_start=1.0, alpha_end=0.0, alpha_steepness=25.0, alpha_threshold=0.005)


def _imagenet_alpha_flow(model: str, steps: int, fid: str, **settings) -> Callable[[], Config]:
    """An official alpha-Flow recipe on the data, network and optimiser of MeanFlow's ImageNet preset."""

    def build() -> Config:
        import dataclasses

        objective = {**_ALPHA_IMAGENET, **settings}
        base = _imagenet(model, 1, objective["omega"], objective["kappa"], objective["t_min"], objective["t_max"],
                         fid)()
        return dataclasses.replace(
            base, objective=_alpha_flow(**objective), training=dataclasses.replace(base.training, steps=steps),
            note=f"ImageNet 256 (SD-VAE latents; set data.path to a cache from `meanflow encode`), {model}, "
                 f"alpha-Flow, {steps} steps at batch 256, alpha sigmoid 1 -> 0 over progress "
                 f"[{objective.get('alpha_begin', 0.0):g}, {objective.get('alpha_finish', 1.0):.4g}]. Paper: {fid} "
                 "(its 2-NFE numbers use the official 'consistency sampling', not Eq. 3 steps).")

    build.__doc__ = f"The official alpha-Flow ImageNet 256 recipe for {model}."
    return build


PRESETS.update({
    "alpha-flow-digits": _on(digits, _ALPHA_CONDITIONAL, "scikit-learn's 8x8 digits, class-conditional, alpha-Flow "
                             "(sigmoid curriculum from trajectory flow matching to MeanFlow, omega'=2). "
                             "No paper number."),
    "alpha-flow-mnist": _on(_image_dit("mnist", "MNIST"), _ALPHA_CONDITIONAL,
                            "MNIST, class-conditional DiT (patch 4), alpha-Flow (sigmoid curriculum, omega'=2). "
                            "No paper number."),
    "imagenet256-alpha-flow-b2": _imagenet_alpha_flow(
        "DiT-B/2", 400_000, "1-NFE FID 40.2, 2-NFE 37.1 without guidance (MeanFlow-B/2 in the same setup: 43.1, "
        "38.5)", fraction_r_neq_t=0.5, omega=1.0, kappa=0.0, t_min=0.0, t_max=1.0, class_dropout=0.0),
    "imagenet256-alpha-flow-b2-cfg": _imagenet_alpha_flow(
        "DiT-B/2", 1_200_000, "1-NFE FID 5.40, 2-NFE 5.01 (MeanFlow-B/2-cfg: 6.04, 5.17)", fraction_r_neq_t=0.75,
        omega=1.0, kappa=0.5, t_min=0.0, t_max=1.0, class_dropout=0.1),
    "imagenet256-alpha-flow-xl2-cfg": _imagenet_alpha_flow(
        "DiT-XL/2", 1_200_000, "1-NFE FID 2.95, 2-NFE 2.34 (MeanFlow-XL/2-cfg: 3.47, 2.46)", fraction_r_neq_t=0.5,
        omega=0.2, kappa=0.92, t_min=0.0, t_max=0.75, class_dropout=0.1, alpha_begin=0.5,
        alpha_finish=1_000_000 / 1_200_000, target_clamp=4.0),
})
PRESETS.update({f"toy-{d.value.replace('_', '-')}-alpha-flow": _on(
    toy(d.value), _ALPHA_TOY, f"2-D toy '{d.value}', unconditional MLP, alpha-Flow. No paper number.")
    for d in ToyDistribution})


def preset(name: str) -> Config:
    """A fresh copy of the named preset; unknown names list the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets are {sorted(PRESETS)}")
    return PRESETS[name]()
