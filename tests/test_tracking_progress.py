"""What a run shows as it trains (issue 27, items 6-8): complete TensorBoard event files, one
progress report from rank 0 with short plain lines, and curves.png that explains itself."""
import os
import struct
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.unit


def read_events(folder) -> list:
    """Every event of the TensorBoard files in ``folder`` (the TFRecord framing: length, its crc,
    the record, its crc), parsed with tensorboardX's protobuf classes."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            events.append(Event.FromString(data[i + 12:i + 12 + length]))
            i += 12 + length + 4
    return events


def test_every_epochs_tags_are_in_the_event_files_when_the_epoch_ends(tmp_path):
    from cpal_ray.engine.tracking import TENSORBOARD_DIR, TrackingHook

    hook = TrackingHook(tmp_path, "run")
    keys = [f"metric_{i}" for i in range(17)]
    for epoch in range(3):
        state = SimpleNamespace(rank=0, epoch=epoch, steps_per_epoch=4, logged=None)
        hook.before_epoch(state)
        for step in range(4):
            state.logged = {"loss": 1.0 / (step + 1), "lr": 0.1} if step % 2 == 0 else None
            hook.after_step(state, step)
        hook.after_epoch(state, {"epoch": epoch, **{k: float(i + epoch) for i, k in enumerate(keys)}})
        # read as TensorBoard would now, while the run goes on (no close at the end of training needed)
        events = [e for e in read_events(tmp_path / TENSORBOARD_DIR) if e.HasField("summary")]
        for e in range(epoch + 1):
            tags = {v.tag for ev in events if ev.step == e for v in ev.summary.value if v.tag.startswith("epoch/")}
            assert tags == {f"epoch/{k}" for k in keys}, (epoch, e, len(tags))
        assert sum(1 for ev in events for v in ev.summary.value if v.tag == "step/loss") == 2 * (epoch + 1)


def test_tensorboard_the_docs_tell_users_to_run_is_a_dependency():
    import tomllib

    from tests.conftest import REPO

    deps = tomllib.loads(open(f"{REPO}/pyproject.toml").read())["project"]["dependencies"]
    assert "tensorboard" in deps  # the `tensorboard --logdir` of the README and of `cpal-ray train --help`


class _Steps:
    """A fake TrainState for StepMeter: CPU, an optimizer with one param group, log_every 2."""

    def __init__(self, rank=0, steps=4, log_every=2):
        self.cfg = SimpleNamespace(train=SimpleNamespace(log_every=log_every))
        self.optimizer = SimpleNamespace(param_groups=[{"lr": 0.01}])
        self.device, self.rank, self.epoch, self.steps_per_epoch, self.logged = "cpu", rank, 3, steps, None


def _run(meter, values):
    import torch

    seen = []
    for step, batch in meter.log_every(range(10)):
        seen.append((step, batch))
        meter.update(torch.tensor(values[step]))
    return seen


@pytest.mark.parametrize("rank", [0, 1])
def test_step_meter_times_averages_calls_hooks_and_reports_from_rank_0_alone(rank, caplog, monkeypatch):
    import logging

    from cpal_ray.engine import progress

    bars, logged = [], []
    monkeypatch.setattr(progress, "bar_factory", lambda it, desc, total: bars.append((desc, total)) or it)
    hook = SimpleNamespace(after_step=lambda state, step, outputs: logged.append((step, state.logged)))
    state = _Steps(rank)
    meter = progress.StepMeter(state, ("loss", "bce"), [hook])
    with caplog.at_level(logging.INFO, logger="cpal_ray.engine.progress"):
        seen = _run(meter, [[1.0, 0.5], [3.0, 1.5], [5.0, 2.5], [7.0, 3.5]])
    assert seen == [(s, s) for s in range(4)] and meter.steps == 4 and meter.means() == [4.0, 2.0]
    assert meter.data_seconds >= 0 and meter.step_seconds >= 0
    assert [s for s, _ in logged] == [0, 1, 2, 3]  # every step's hooks, after the step
    assert [v for _, v in logged] == [{"loss": 1.0, "bce": 0.5, "lr": 0.01}, None,
                                      {"loss": 5.0, "bce": 2.5, "lr": 0.01}, None]
    lines = [r.getMessage() for r in caplog.records]
    if rank == 0:
        assert bars == [("epoch 3", 4)] and len(lines) == 2
        assert lines[1].startswith("epoch 3 step 3/4: loss 4.0000 bce 2.0000 lr 1.00e-02")  # steps 1-2 averaged
        assert all(len(line) <= progress.MAX_LINE and "\x1b" not in line for line in lines)
    else:
        assert bars == [] and lines == []


def test_step_meter_names_the_first_non_finite_step_and_its_terms():
    from cpal_ray.engine.progress import StepMeter

    meter = StepMeter(_Steps(rank=1, log_every=2), ("loss", "bce"))
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 3 step 1 \(rank 1\): "
                                                 r"\{'loss': nan, 'bce': 1.0\}"):
        _run(meter, [[1.0, 0.5], [float("nan"), 1.0], [5.0, 2.5], [7.0, 3.5]])


def test_long_log_lines_are_cut():
    import logging

    from cpal_ray.engine.progress import MAX_LINE, ShortLines

    record = logging.LogRecord("ray.train", logging.INFO, __file__, 1, "Reporting %s", ("x" * 5000,), None)
    assert ShortLines().filter(record) and len(record.getMessage()) == MAX_LINE
    record = logging.LogRecord("ray", logging.INFO, __file__, 1, "dashboard at \x1b[1m\x1b[32mhttp://h:8265\x1b[39m", (),
                               None)
    assert ShortLines(None, plain=True).filter(record) and record.getMessage() == "dashboard at http://h:8265"


def test_no_colour_codes_in_worker_output_when_not_a_terminal(monkeypatch):
    from cpal_ray.distributed import runtime

    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    monkeypatch.setattr(runtime, "interactive", lambda: False)
    runtime.plain_worker_output()
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
    monkeypatch.delenv("RAY_COLOR_PREFIX")
    monkeypatch.setattr(runtime, "interactive", lambda: True)
    runtime.plain_worker_output()
    assert "RAY_COLOR_PREFIX" not in os.environ


def test_curves_have_a_title_whole_epochs_an_lr_panel_and_say_why_a_panel_is_empty():
    from cpal_ray.inference.visuals import curves_figure

    history = [{"epoch": e, "bce": 0.7 - 0.1 * e, "self": 0.1, "lr": 0.05 * (1 - e / 3), "self_image_share": 0.5,
                "self_class_share": 0.4, "bank_fill": [4, 4], "classes_below_k": []} for e in range(3)]
    fig = curves_figure({"synthetic-tiny": history})  # train.diag_images=0: no diag_* numbers
    assert fig._suptitle.get_text() == "synthetic-tiny: training curves (3 epochs)"
    panels = {ax.get_title(): ax for ax in fig.axes}
    lr = panels["learning rate (end of epoch)"]
    assert list(lr.lines[0].get_ydata()) == [0.05, 0.05 * (1 - 1 / 3), 0.05 * (1 - 2 / 3)]
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)
    empty = [ax for ax in fig.axes if not ax.lines]
    assert len(empty) == 3 and all("train.diag_images=0" in ax.texts[0].get_text() for ax in empty)


def test_the_threshold_plot_says_how_many_images_it_scored():
    from cpal_ray.inference.metrics import threshold_figure

    fig = threshold_figure({"thresholds": [0.2, 0.3], "miou": [0.4, 0.5], "best_threshold": 0.3, "best_miou": 0.5,
                            "images": 4})
    assert fig.axes[0].get_title() == "seed mIoU of 4 images: best 50.00 at 0.30"


def test_the_epoch_record_has_the_learning_rate():
    import torch

    from cpal_ray.config import load_config
    from cpal_ray.engine import fit_local

    cfg = load_config("configs/synthetic_tiny.yaml", ["train.epochs=2", "train.max_steps_per_epoch=2",
                                                      "data.synthetic_images=16", "cpal.enabled=false",
                                                      "dist.num_workers=1", "train.diag_images=0"])
    torch.manual_seed(0)
    record = fit_local(cfg).history[0]
    assert 0 < record["lr"] < cfg.optim.lr  # the poly schedule half-way


def test_a_ray_worker_draws_a_bar_through_the_driver_only_on_rank_0_and_only_for_a_terminal():
    from cpal_ray.distributed.train_loop import report_progress
    from cpal_ray.engine import progress

    try:
        for rank, terminal in ((1, True), (0, False)):
            report_progress(rank, terminal)
            assert progress.bar_factory(range(3), "epoch 0", 3) is None, (rank, terminal)
        report_progress(0, True)
        bar = progress.bar_factory(range(3), "epoch 0", 3)
        assert type(bar).__module__ == "ray.experimental.tqdm_ray"
    finally:
        progress.set_bar_factory(None)
