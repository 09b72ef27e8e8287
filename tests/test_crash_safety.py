"""A real training process killed inside a checkpoint write, a prune or a metrics append loses
nothing: running the same command again resumes from the newest complete checkpoint, lists no
broken folder, keeps every complete metrics line, and ends with the weights of a run that was
never interrupted.

The kills are deterministic: this file is also the driver. ``python tests/test_crash_safety.py
PLAN train ...`` runs the real ``meanflow train`` command in-process with ``os.rename``,
``shutil.rmtree`` and ``os.write`` wrapped, and at the n-th call on a matching file does what the
plan says (SIGKILL itself before / after the call or half-way through it, or send itself SIGTERM).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
STEPS = 5


# -- the driver -----------------------------------------------------------------------------

def _install(plan: list[dict]) -> None:
    """Wrap os.rename / shutil.rmtree / os.write so that each entry of ``plan`` fires once, at
    the ``nth`` call whose file name fully matches ``name`` (a regex)."""
    counts = [0] * len(plan)

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    def fire(call: str, name: str) -> list[dict]:
        chosen = []
        for index, entry in enumerate(plan):
            if entry["call"] == call and re.fullmatch(entry["name"], name):
                counts[index] += 1
                if counts[index] == entry.get("nth", 1):
                    chosen.append(entry)
        for entry in chosen:
            if entry["when"] == "sigterm":  # a preemption notice: the loop saves and stops
                os.kill(os.getpid(), signal.SIGTERM)
            elif entry["when"] == "before":
                kill()
        return [entry for entry in chosen if entry["when"] in ("after", "partial")]

    real_rename, real_rmtree, real_write = os.rename, shutil.rmtree, os.write

    def rename(source, target, *args, **kwargs):
        chosen = fire("rename", Path(source).name)
        real_rename(source, target, *args, **kwargs)
        if chosen:
            kill()

    def rmtree(path, *args, **kwargs):
        chosen = fire("rmtree", Path(path).name)
        if any(entry["when"] == "partial" for entry in chosen):
            for child in sorted(Path(path).iterdir()):  # a delete cut short: trainer.json survives
                if child.name != "trainer.json":
                    child.unlink()
            kill()
        real_rmtree(path, *args, **kwargs)
        if chosen:
            kill()

    def write(descriptor, data):
        try:
            name = Path(os.readlink(f"/proc/self/fd/{descriptor}")).name
        except OSError:
            name = ""
        chosen = fire("write", name) if name else []
        if any(entry["when"] == "partial" for entry in chosen):
            real_write(descriptor, bytes(data)[:len(data) // 2])  # a line torn by the kill
            kill()
        written = real_write(descriptor, data)
        if chosen:
            kill()
        return written

    os.rename, shutil.rmtree, os.write = rename, rmtree, write


if __name__ == "__main__":
    _install(json.loads(sys.argv[1]))
    from meanflow.cli import main

    sys.exit(main(sys.argv[2:]))


# -- the tests --------------------------------------------------------------------------------

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="the driver names files through /proc")


def command(folder: Path, *settings: str) -> list[str]:
    """The training command of every test: a tiny checkerboard run of STEPS steps."""
    arguments = ["train", "--preset", "toy-checkerboard", "--output", str(folder), "--no-progress",
                 "--steps", str(STEPS), "--set", "model.options.hidden_size=16", "--set", "training.batch_size=64",
                 "--set", "training.log_every=1", "--set", "training.grid_samples=16",
                 "--set", "training.grid_steps=[1]"]
    for setting in settings:
        arguments += ["--set", setting]
    return arguments


def run(arguments: list[str], plan=None) -> subprocess.CompletedProcess:
    """``meanflow`` in a new process: the plain command, or the driver with a kill plan."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    head = [sys.executable, __file__, json.dumps(plan)] if plan is not None else [sys.executable, "-m", "meanflow.cli"]
    return subprocess.run(head + arguments, capture_output=True, text=True, env=env, timeout=300, check=False)


def listing(folder: Path) -> tuple[list[str], list[str]]:
    """(names of the listed checkpoints, incomplete-checkpoint warnings raised while listing)."""
    from meanflow.checkpoint import IncompleteCheckpointWarning, list_checkpoints

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = [path.name for path in list_checkpoints(folder / "checkpoints")]
    return found, [str(w.message) for w in caught if issubclass(w.category, IncompleteCheckpointWarning)]


def metrics_lines(folder: Path) -> list[bytes]:
    return (folder / "metrics.jsonl").read_bytes().splitlines(keepends=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final model weights of the same run trained without a kill."""
    from meanflow.checkpoint import load_checkpoint

    folder = tmp_path_factory.mktemp("uninterrupted")
    done = run(command(folder, "training.checkpoint_every=1"))
    assert done.returncode == 0, done.stderr
    return load_checkpoint(folder).model


def resume_and_check(folder: Path, arguments: list[str], uninterrupted, resumed_from: int):
    """Run the same command again: it resumes from ``resumed_from`` and ends like the uninterrupted run."""
    import torch

    from meanflow.checkpoint import load_checkpoint

    before = metrics_lines(folder)
    done = run(arguments)
    assert done.returncode == 0, done.stderr
    assert f"trained to step {STEPS}" in done.stdout
    found, warned = listing(folder)
    assert not warned and found[-1] == f"step_{STEPS:09d}"
    leftovers = [p.name for p in (folder / "checkpoints").iterdir() if p.name not in found]
    assert leftovers == [], "transient folders were not cleaned up"
    final = load_checkpoint(folder)
    assert all(torch.equal(final.model[key], value) for key, value in uninterrupted.items()), "progress was lost"
    lines = metrics_lines(folder)
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))
    kept = [line for line in before if line.endswith(b"\n") and json.loads(line)["step"] <= resumed_from]
    assert lines[:len(kept)] == kept and len(kept) == resumed_from  # complete lines kept byte for byte
    return done


# A stop signal during the commit of step 2 makes the loop save step 3 twice (the periodic save,
# then the stop's save): the second is a re-save of an existing step, killed at each point of it.
RESAVE = {"call": "rename", "name": r"step_000000002\.tmp", "when": "sigterm"}


@pytest.mark.parametrize("kill, listed", [
    # the old folder moved aside, the new one not yet in: the whole old copy is used
    ({"call": "rename", "name": "step_000000003", "when": "after"}, "step_000000003.old"),
    # the new folder in, the old copy half deleted (the old protocol deleted step_3 itself here)
    ({"call": "rmtree", "name": r"step_000000003(\.deleting)?", "when": "partial"}, "step_000000003"),
    # the new folder in, the old copy not yet renamed for deletion
    ({"call": "rename", "name": r"step_000000003\.old", "when": "before"}, "step_000000003"),
], ids=["between-renames", "deleting-old-copy", "before-deleting"])
def test_a_kill_inside_a_resave_of_the_same_step_loses_nothing(tmp_path, uninterrupted, kill, listed):
    arguments = command(tmp_path, "training.checkpoint_every=1", "training.keep_checkpoints=10")
    from meanflow.checkpoint import load_checkpoint

    killed = run(arguments, plan=[RESAVE, kill])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    found, warned = listing(tmp_path)
    assert found == ["step_000000001", "step_000000002", listed] and not warned
    assert load_checkpoint(tmp_path / "checkpoints" / listed).step == 3  # whole: every file loads
    resume_and_check(tmp_path, arguments, uninterrupted, resumed_from=3)


def test_a_kill_while_pruning_lists_no_broken_folder(tmp_path, uninterrupted):
    from meanflow.checkpoint import load_checkpoint

    arguments = command(tmp_path, "training.checkpoint_every=1", "training.keep_checkpoints=2")
    # pruning step 1 after the commit of step 3, killed half-way through the delete
    killed = run(arguments, plan=[{"call": "rmtree", "name": r"step_000000001(\.deleting)?", "when": "partial"}])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    found, warned = listing(tmp_path)
    assert found == ["step_000000002", "step_000000003"] and not warned
    assert all(load_checkpoint(tmp_path / "checkpoints" / name).step == int(name[5:]) for name in found)
    resume_and_check(tmp_path, arguments, uninterrupted, resumed_from=3)
    assert listing(tmp_path)[0] == ["step_000000004", "step_000000005"]


def test_a_kill_inside_a_metrics_append_drops_only_the_torn_line(tmp_path, uninterrupted):
    arguments = command(tmp_path, "training.checkpoint_every=1")
    killed = run(arguments, plan=[{"call": "write", "name": r"metrics\.jsonl", "nth": 4, "when": "partial"}])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    lines = metrics_lines(tmp_path)
    assert len(lines) == 4 and not lines[-1].endswith(b"\n")  # step 4's line is torn
    assert listing(tmp_path)[0][-1] == "step_000000003"
    resumed = resume_and_check(tmp_path, arguments, uninterrupted, resumed_from=3)
    assert "dropped a torn last line" in resumed.stderr


def test_repeated_kills_in_metrics_appends_never_lose_a_complete_line(tmp_path, uninterrupted):
    arguments = command(tmp_path, "training.checkpoint_every=2")
    # killed while logging step 4 (before its checkpoint: the run resumes from step 2)...
    first = run(arguments, plan=[{"call": "write", "name": r"metrics\.jsonl", "nth": 4, "when": "partial"}])
    assert first.returncode == -signal.SIGKILL
    complete = metrics_lines(tmp_path)[:2]
    # ...then again while logging the first step after resuming (step 3)
    second = run(arguments, plan=[{"call": "write", "name": r"metrics\.jsonl", "nth": 1, "when": "partial"}])
    assert second.returncode == -signal.SIGKILL and "dropped a torn last line" in second.stderr
    assert metrics_lines(tmp_path)[:2] == complete and len(metrics_lines(tmp_path)) == 3
    resume_and_check(tmp_path, arguments, uninterrupted, resumed_from=2)


# -- the metrics log on its own -----------------------------------------------------------

def write_lines(path: Path, steps, tail: bytes = b"") -> list[bytes]:
    lines = [(json.dumps({"step": step, "loss": 1.0 / step}) + "\n").encode() for step in steps]
    path.write_bytes(b"".join(lines) + tail)
    return lines


def test_resuming_cuts_the_log_back_after_the_resumed_step_without_rewriting_it(tmp_path):
    from meanflow.train.logging import MetricsLog

    path = tmp_path / "metrics.jsonl"
    lines = write_lines(path, range(1, 9))
    inode = path.stat().st_ino
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lines past the resumed step go silently
        log = MetricsLog(tmp_path, resumed_step=5)
    log.write({"step": 6, "loss": 0.5})
    log.sync()
    log.close()
    assert path.stat().st_ino == inode  # the same file, cut back and appended to
    assert path.read_bytes() == b"".join(lines[:5]) + b'{"step": 6, "loss": 0.5}\n'


@pytest.mark.parametrize("tail, message", [
    (b'{"step": 6, "lo', "a torn last line (15 bytes"),
    (b'\x00\x00\x00\x00\n', "1 damaged line(s)"),
])
def test_a_torn_or_damaged_tail_is_dropped_with_a_warning(tmp_path, tail, message):
    from meanflow.train.logging import MetricsLog

    path = tmp_path / "metrics.jsonl"
    lines = write_lines(path, range(1, 6), tail)
    with pytest.warns(RuntimeWarning, match=re.escape(message)):
        MetricsLog(tmp_path, resumed_step=5).close()
    assert path.read_bytes() == b"".join(lines)


def test_a_last_line_cut_just_before_its_newline_is_kept(tmp_path):
    from meanflow.train.logging import MetricsLog

    path = tmp_path / "metrics.jsonl"
    lines = write_lines(path, range(1, 4))
    path.write_bytes(path.read_bytes()[:-1])
    MetricsLog(tmp_path, resumed_step=3).close()
    assert path.read_bytes() == b"".join(lines)


def test_a_long_log_is_read_backwards_only_as_far_as_needed(tmp_path, monkeypatch):
    from meanflow.train import logging as run_log

    path = tmp_path / "metrics.jsonl"
    lines = write_lines(path, range(1, 20001), b'{"step": 20001')
    read = []
    real = run_log._lines_from_end

    def counting(handle, size, block=1 << 16):
        for offset, line in real(handle, size, block=4096):
            read.append(line)
            yield offset, line

    monkeypatch.setattr(run_log, "_lines_from_end", counting)
    with pytest.warns(RuntimeWarning, match="torn last line"):
        run_log.cut_back(path, resumed_step=19990)
    assert len(read) == 12 and path.read_bytes() == b"".join(lines[:19990])
    run_log.cut_back(path, resumed_step=0)  # a run restarted from scratch keeps nothing
    assert path.read_bytes() == b""


# -- the write protocol and the listing on their own ------------------------------------------

def save(root: Path, step: int, value: float = 0.0, **retention) -> Path:
    import torch

    from meanflow.checkpoint import save_checkpoint

    return save_checkpoint(root, step, {"w": torch.full((2,), value)}, {}, ({}, {"param_groups": [], "scalars": {}}),
                           {}, **retention)


def names(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir())


def test_a_resave_replaces_the_step_and_leaves_no_transient_folder(tmp_path):
    from meanflow.checkpoint import load_checkpoint

    save(tmp_path, 3, value=1.0)
    save(tmp_path, 3, value=2.0)
    assert names(tmp_path) == ["step_000000003"]
    assert load_checkpoint(tmp_path).model["w"].tolist() == [2.0, 2.0]


def test_the_listing_skips_incomplete_folders_with_one_warning_and_never_fails(tmp_path):
    from meanflow.checkpoint import IncompleteCheckpointWarning, latest_checkpoint, list_checkpoints

    for step in (1, 2):
        save(tmp_path, step)
    (tmp_path / "step_000000003").mkdir()
    (tmp_path / "step_000000003" / "trainer.json").write_text('{"step": 3}')  # an old-style delete cut short
    for leftover in ("step_000000004.tmp", "step_000000005.deleting", "notes", "step_7"):
        (tmp_path / leftover).mkdir()
    with pytest.warns(IncompleteCheckpointWarning) as caught:
        assert latest_checkpoint(tmp_path).name == "step_000000002"
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "step_000000003 (lacks model.safetensors, ema.safetensors, optimizer.safetensors)" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per folder: the second listing is silent
        assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000001", "step_000000002"]
        assert list_checkpoints(tmp_path / "absent") == [] and list_checkpoints(tmp_path / "notes") == []
        (tmp_path / "a_file").write_text("x")
        assert list_checkpoints(tmp_path / "a_file") == []


def test_an_old_copy_moved_aside_is_listed_until_the_next_save_puts_it_back(tmp_path):
    from meanflow.checkpoint import list_checkpoints, load_checkpoint

    save(tmp_path, 1)
    save(tmp_path, 2, value=5.0)
    os.rename(tmp_path / "step_000000002", tmp_path / "step_000000002.old")  # a re-save killed between renames
    (tmp_path / "step_000000002.tmp").mkdir()  # its staging folder, whole or not
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000001", "step_000000002.old"]
    assert load_checkpoint(tmp_path).model["w"].tolist() == [5.0, 5.0]
    save(tmp_path, 3)
    assert names(tmp_path) == ["step_000000001", "step_000000002", "step_000000003"]


def test_pruning_also_removes_incomplete_folders_older_than_the_kept_ones(tmp_path):
    for step in (1, 2):
        save(tmp_path, step)
    for leftover in ("model.safetensors", "ema.safetensors"):
        (tmp_path / "step_000000001" / leftover).unlink()  # an old-style delete cut short
    with pytest.warns(UserWarning, match="step_000000001"):
        save(tmp_path, 3, keep_last=2, milestone_every=2)
    save(tmp_path, 4, keep_last=2, milestone_every=2)
    assert names(tmp_path) == ["step_000000002", "step_000000003", "step_000000004"]  # 2: a milestone
