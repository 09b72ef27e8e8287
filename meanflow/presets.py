"""Named run configurations. ``meanflow train --preset NAME`` starts from one of these."""

from __future__ import annotations

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


def preset(name: str) -> Config:
    """A fresh copy of the named preset; unknown names list the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets are {sorted(PRESETS)}")
    return PRESETS[name]()
