"""What a run shows as it trains (issue 27, items 6-8): complete TensorBoard event files, one
progress report from rank 0 with short plain lines, and curves.png that explains itself."""
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
