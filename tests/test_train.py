"""The training loop end to end on real files: checkpoints, exact resume, logs, grids."""

import json

import pytest
import torch

from meanflow.checkpoint import list_checkpoints, load_checkpoint
from meanflow.config import Config
from meanflow.inference import generate, load_model
from meanflow.presets import preset
from meanflow.train import train


def tiny_toy(steps=20):
    return preset("toy-eight-gaussians").with_overrides([
        f"training.steps={steps}", "training.batch_size=64", "training.log_every=5", "training.checkpoint_every=10",
        "model.options.hidden_size=32", "model.options.depth=2", "training.grid_samples=64",
    ])


def tiny_digits(steps=6):
    return preset("digits").with_overrides([
        f"training.steps={steps}", "training.batch_size=16", "training.log_every=2", "training.checkpoint_every=3",
        "model.options.hidden_size=32", "model.options.depth=2", "model.options.num_heads=2",
        "training.grid_samples=20", "training.ema_decays=[0.9, 0.99]",
    ])


def weights(path):
    return load_checkpoint(path).model


def test_a_run_writes_checkpoints_logs_config_and_grids(tmp_path):
    result = train(tiny_toy(), tmp_path, progress=False)
    assert result.step == 20
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_000000010", "step_000000020"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [5, 10, 15, 20]
    for key in ("loss", "unweighted_error", "velocity_error", "fraction_r_neq_t", "grad_norm", "lr", "samples_per_second"):
        assert all(key in line and line[key] == line[key] for line in lines)  # present and not NaN
    assert Config.load(tmp_path / "config.json").to_dict() == tiny_toy().to_dict()
    assert [p.name for p in result.grids] == ["step000000020_nfe1.png", "step000000020_nfe2.png"]
    assert all(p.stat().st_size > 1000 for p in result.grids)
    state = json.loads((tmp_path / "checkpoints" / "step_000000020" / "trainer.json").read_text())
    record = json.loads((tmp_path / "checkpoints" / "step_000000020" / "run.json").read_text())
    assert state["step"] == 20 and record["ema_names"] == ["ema_0.999"]  # what a run is: run.json, once
    assert "config" not in state and record["config"] == tiny_toy().to_dict()


@pytest.mark.parametrize("build, first, total", [(tiny_toy, 10, 20), (tiny_digits, 3, 6)])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, build, first, total):
    straight = train(build(total), tmp_path / "straight", progress=False)
    train(build(total), tmp_path / "resumed", progress=False, max_steps=first)
    resumed = train(build(total), tmp_path / "resumed", progress=False)  # same command again
    assert resumed.step == straight.step == total
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    for part in ("model", "ema", "optimizer"):
        left, right = getattr(a, part), getattr(b, part)
        assert left.keys() == right.keys()
        for key in left:
            assert torch.equal(left[key], right[key]), f"{part}/{key} differs after resume"
    log = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert log == sorted(set(log))  # no duplicated steps after resume


def test_class_conditional_digits_with_guidance_runs_and_samples(tmp_path):
    result = train(tiny_digits(), tmp_path, progress=False)
    loaded = load_model(tmp_path, weights="ema_0.99")
    assert loaded.num_classes == 10 and loaded.sample_shape == (1, 8, 8) and loaded.step == 6
    labels = torch.arange(10)
    one = generate(loaded.model, 10, loaded.sample_shape, 1, labels, seed=3)
    again = generate(loaded.model, 10, loaded.sample_shape, 1, labels, seed=3, batch_size=4)
    assert one.shape == (10, 1, 8, 8) and torch.isfinite(one).all()
    assert not torch.equal(one, generate(loaded.model, 10, loaded.sample_shape, 2, labels, seed=3))
    torch.testing.assert_close(one[:4], again[:4])  # first batch identical; noise is per batch index
    with pytest.raises(ValueError, match="unknown weights"):
        load_model(tmp_path, weights="ema_0.5")
    assert result.grids[0].exists()


def test_model_that_does_not_fit_the_data_is_refused_before_training(tmp_path):
    config = tiny_digits().with_overrides(["model.options.input_size=16"])
    with pytest.raises(ValueError, match="input_size=16 but images have shape"):
        train(config, tmp_path, progress=False)
    config = tiny_digits().with_overrides(["data.class_conditional=false"])
    with pytest.raises(ValueError, match="num_classes=10 but the data has no classes"):
        train(config, tmp_path, progress=False)


def test_resuming_with_another_architecture_is_refused(tmp_path):
    train(tiny_toy(10), tmp_path, progress=False)
    wider = tiny_toy(20).with_overrides(["model.options.hidden_size=48"])
    with pytest.raises(ValueError, match=r"other settings[\s\S]*model.options.hidden_size"):
        train(wider, tmp_path, progress=False)  # the config check names the change first
    allowed = wider.with_overrides(["training.allow_changed_config=true"])
    with pytest.raises(ValueError, match="shape differences"):
        train(allowed, tmp_path, progress=False)  # and the weights themselves cannot be loaded


def test_learning_rate_schedule_warms_up_then_stays_or_follows_a_half_cosine():
    import math

    from meanflow.config import OptimConfig
    from meanflow.train import lr_factor

    assert [lr_factor(s, 4, 100, "constant") for s in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, 4, 104, "cosine") for s in range(104)]
    assert cosine[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert cosine[54] == pytest.approx(0.5) and cosine[29] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert all(a >= b for a, b in zip(cosine[4:], cosine[5:])) and 0 < cosine[-1] < 1e-3
    with pytest.raises(ValueError, match="optim.decay must be one of"):
        OptimConfig(decay="linear")


def test_cosine_schedule_reaches_the_logged_learning_rate(tmp_path):
    config = preset("toy-two-moons").with_overrides([
        "training.steps=20", "training.batch_size=16", "training.log_every=10", "model.options.hidden_size=16",
        "training.grid_samples=16", "optim.decay=cosine", "optim.warmup_steps=0", "optim.lr=0.01"])
    train(config, tmp_path, progress=False)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # The optimizer's lr after n steps (the rate of step n + 1): half the base at 10 of 20, 0 at the end.
    assert logged == [pytest.approx(0.005), pytest.approx(0.0, abs=1e-12)]


def test_a_custom_loop_gets_the_schedule_and_ema_from_meanflow_train():
    from meanflow.train import EMA, build_schedule, lr_factor

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = build_schedule(optimizer, warmup=2, total=10, decay="cosine")
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == [pytest.approx(0.1 * lr_factor(s, 2, 10, "cosine")) for s in range(4)]
    assert rates[:2] == [pytest.approx(0.05), pytest.approx(0.1)]
    assert EMA(model, (0.5,)).names == ("ema_0.5",)
    with pytest.raises(ValueError, match="decay must be 'constant' or 'cosine'"):
        build_schedule(optimizer, 0, 10, "linear")


def test_the_metric_window_averages_on_the_device_and_reads_once():
    from meanflow.distributed import Distributed
    from meanflow.train.metrics import MetricWindow

    window = MetricWindow()
    single = Distributed(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for value in (1.0, 2.0, 6.0):
        window.add({"loss": torch.tensor(value), "grad_norm": torch.tensor(2 * value)})
    reading = window.read(single)
    assert reading.means == {"grad_norm": 6.0, "loss": 3.0} and reading.steps == 3
    assert window.read(single).steps == 0  # a new window
    with pytest.raises(ValueError, match="metrics changed"):
        window.add({"loss": torch.tensor(1.0)})  # the names are fixed for the run


def test_a_training_step_reads_the_device_once(tmp_path, monkeypatch):
    """The loop's own host reads per step (the objective's are its own): one flag, not one
    float per metric. Counted by wrapping every Tensor method that returns a host value."""
    import traceback

    from meanflow.train.loop import Trainer

    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            caller = traceback.extract_stack(limit=2)[0].filename.replace("\\", "/")
            if "/meanflow/train/" in caller or caller.endswith(("/meanflow/distributed.py", "/meanflow/progress.py")):
                reads.append(caller)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    trainer = Trainer(tiny_toy(12).with_overrides(["training.log_every=4"]), tmp_path, progress=True)
    per_step = []
    real_step = trainer.train_step

    def step(*args, **kwargs):
        before = len(reads)
        outcome = real_step(*args, **kwargs)
        per_step.append(len(reads) - before)
        return outcome

    trainer.train_step = step
    trainer.run()
    assert per_step == [1] * 12


def test_resuming_with_other_settings_is_refused_unless_allowed_and_then_the_new_lr_applies(tmp_path):
    from meanflow.presets import preset

    base = ["training.steps=4", "training.batch_size=32", "training.checkpoint_every=2", "training.grid_steps=[1]",
            "training.grid_samples=16", "model.options.hidden_size=16", "model.options.depth=2",
            "optim.warmup_steps=0"]
    config = preset("toy-checkerboard").with_overrides(base)
    train(config, tmp_path, progress=False, max_steps=2)
    longer = config.with_overrides(["training.steps=6", "training.log_every=1"])  # length and logs: free
    changed = config.with_overrides(["optim.lr=0.01", "training.batch_size=16"])
    with pytest.raises(ValueError, match=r"other settings[\s\S]*optim.lr: 0.001 -> 0.01[\s\S]*"
                                         r"training.batch_size: 32 -> 16[\s\S]*training.allow_changed_config=true"):
        train(changed, tmp_path, progress=False)
    allowed = config.with_overrides(["optim.lr=0.01", "training.allow_changed_config=true"])
    from meanflow.train.loop import Trainer

    trainer = Trainer(allowed, tmp_path, progress=False)
    trainer.resume()
    assert trainer.state.step == 2
    assert [group["lr"] for group in trainer.state.optimizer.param_groups] == [0.01]  # the new rate, not the old
    del trainer
    assert train(longer, tmp_path, progress=False).step == 6
