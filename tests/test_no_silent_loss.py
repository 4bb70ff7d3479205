"""Nothing lost or mixed silently (issue 24): every file of a checkpoint is verified before it is
resumed, exported or read; a resume checks its config; run names stay in their storage folder.

Each test here fails on the code before the fix (a bit-flipped ``model.pt`` was exported as the
final model, a damaged ``config.yaml`` was read as defaults, ...). The Ray side (a real resume
past a damaged checkpoint) is in tests/test_resume_ray.py.
"""
from types import SimpleNamespace

import pytest
import torch

from cpal_ray.config import load_config
from cpal_ray.engine import CheckpointError, checkpoint_state, load_checkpoint, write_checkpoint
from cpal_ray.engine.checkpoint import SUMS_FILE
from cpal_ray.storage import location

pytestmark = pytest.mark.unit


def tiny_cfg(**over):
    return load_config("configs/synthetic_tiny.yaml", over)


def flip_bit(path, at: float = 0.5) -> None:
    """One flipped bit: a copy torch or YAML would still read without a word."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x04
    path.write_bytes(bytes(data))


def small_checkpoint(folder, cfg=None, epoch: int = 1):
    state = checkpoint_state(model=torch.nn.Linear(3, 2), cfg=cfg or tiny_cfg(), epoch=epoch, global_step=4)
    return write_checkpoint(folder, state)


# ------------------------------------------------------------------------------ item 1: verified files

@pytest.mark.parametrize("name", ["state.pt", "model.pt", "config.yaml"])
def test_every_file_of_a_checkpoint_is_verified_with_a_bit_flip(tmp_path, name):
    small_checkpoint(tmp_path / "ck")
    assert load_checkpoint(tmp_path / "ck")["epoch"] == 1
    flip_bit(tmp_path / "ck" / name)
    with pytest.raises(CheckpointError, match=rf"ck/{name}: damaged"):
        load_checkpoint(tmp_path / "ck")


def test_a_damaged_checksum_record_checks_nothing_and_is_refused(tmp_path):
    small_checkpoint(tmp_path / "ck")
    sums = tmp_path / "ck" / SUMS_FILE
    lines = sums.read_text().splitlines()
    sums.write_text("\n".join([lines[0], lines[1].replace("model.pt", "m0del.pt"), lines[2]]) + "\n")
    with pytest.raises(CheckpointError, match=r"SHA256SUMS: does not list model\.pt"):
        load_checkpoint(tmp_path / "ck")
    sums.write_text(lines[0][:20] + "\n")
    with pytest.raises(CheckpointError, match="SHA256SUMS: line 1"):
        load_checkpoint(tmp_path / "ck")


def test_export_final_refuses_a_bit_flipped_model_and_writes_nothing(tmp_path):
    from cpal_ray.distributed.trainer import export_final

    small_checkpoint(tmp_path / "ck")
    export_final(location(tmp_path / "ck"), location(tmp_path / "good"), history=[])
    assert load_checkpoint(tmp_path / "good")["epoch"] == 1 and (tmp_path / "good" / SUMS_FILE).is_file()
    flip_bit(tmp_path / "ck" / "model.pt")
    with pytest.raises(CheckpointError, match=r"ck/model\.pt: damaged"):
        export_final(location(tmp_path / "ck"), location(tmp_path / "final"), history=[])
    assert not (tmp_path / "final").exists()


def test_a_damaged_config_of_a_checkpoint_is_refused_never_read_as_defaults(tmp_path):
    from workflows.common import config_from_folders

    small_checkpoint(tmp_path / "ck")
    args = SimpleNamespace(config=None, overrides=[])
    assert config_from_folders(args, tmp_path / "ck").model.backbone == "tiny"
    config = tmp_path / "ck" / "config.yaml"
    text = config.read_text()
    config.write_text(text[: text.index("model:")])  # the model section lost: it would read as resnet50
    with pytest.raises(CheckpointError, match=r"ck/config\.yaml: damaged"):
        config_from_folders(args, tmp_path / "ck")
