"""The user guide in docs/ stays true: the config reference matches cpal_ray/config/, and every
command and override the guides show is accepted by the config loader."""
import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from cpal_ray.config import Config, config_file, load_config

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
GUIDES = sorted(p for p in DOCS.glob("*.md") if p.name != "config.md")
SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
OVERRIDE = re.compile(rf"^({'|'.join(SECTIONS)})\.\w+=\S+$")
FENCE = re.compile(r"```(?:bash|sh)?\n(.*?)```", re.S)


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def shell_commands(md: Path) -> list[list[str]]:
    """Commands in the fenced blocks of a guide, continuation lines joined, comments dropped."""
    out = []
    for block in FENCE.findall(md.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                try:
                    out.append(shlex.split(line))
                except ValueError:
                    pass
    return out


def workflow_calls() -> list[tuple[str, list[str]]]:
    calls = []
    for md in GUIDES:
        for argv in shell_commands(md):
            if "-m" in argv and argv[argv.index("-m") + 1].startswith("workflows."):
                calls.append((f"{md.name}: {' '.join(argv)}", argv))
    return calls


def test_config_reference_is_up_to_date():
    gen = load_generator()
    assert (DOCS / "config.md").read_text() == gen.render(), \
        "docs/config.md is out of date: run `python docs/gen_config_reference.py`"


def test_config_reference_lists_every_field():
    text = (DOCS / "config.md").read_text()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            assert f"`{section.name}.{f.name}`" in text


def test_comment_parser_reads_inline_and_shared_comments():
    gen = load_generator()
    from cpal_ray.config import CPALConfig, DataConfig

    cpal = gen.field_comments(CPALConfig)
    assert cpal["lambda_self"] == cpal["lambda_bce"] == "lambda_BCE and lambda_Self of Eq. 1."
    assert cpal["alignment"].endswith("shift delta_n of Eq. 12")
    assert cpal["alignment"].startswith("Ablation switches")
    assert "spherical k-means" in cpal["normalize_bank"]
    assert "shipped photos" in gen.field_comments(DataConfig)["root"]
    assert gen.split_inline_comment('x: str = "a#b"  # c') == ('x: str = "a#b"', "c")
    assert gen.paper_refs("Eq. 7 (Table 3), Sec. 4.1 and (DESIGN.md, 'Reading\n  the paper: similarity and gamma')") \
        == "Eq. 7, Table 3, Sec. 4.1, Reading the paper: similarity and gamma"


def test_every_documented_workflow_command_has_a_valid_config():
    calls = workflow_calls()
    assert len(calls) >= 20, "expected the reproduce/cluster commands to be found"
    for where, argv in calls:
        overrides = [a for a in argv if OVERRIDE.match(a)]
        cfg_path = argv[argv.index("--config") + 1] if "--config" in argv else None
        if cfg_path is None or not cfg_path.startswith("configs/"):
            # A run's own final/config.yaml (written by training) or no config at all.
            assert not overrides or cfg_path is None, where
            cfg_path = None
        else:
            assert config_file(cfg_path).is_file(), where  # a shipped config, found from any directory
        load_config(cfg_path, overrides)


def test_override_cells_of_the_paper_tables_are_valid():
    text = FENCE.sub("", (DOCS / "reproduce.md").read_text())
    groups = [g.split() for g in re.findall(r"`([^`\n]+)`", text)]
    groups = [g for g in groups if g and all(OVERRIDE.match(t) for t in g)]
    assert len(groups) >= 12, "the Table 1-3 override cells were not found"
    for g in groups:
        load_config("configs/voc_resnet50_8gpu.yaml", g)


def test_table1_rows_match_the_reading():
    """Rows II-IV have no L_self and take their seeds from the PACAM; row V uses the CAM."""
    text = (DOCS / "reproduce.md").read_text()
    for row in ("t1-II", "t1-III", "t1-IV"):
        line = next(l for l in text.splitlines() if f"train.name={row} " in l or l.endswith(f"train.name={row}"))
        cfg = load_config("configs/voc_resnet50_8gpu.yaml", [t for t in line.split() if OVERRIDE.match(t)])
        assert (cfg.cpal.self_loss, cfg.inference.cam_source) == (False, "pacam"), row
    line = next(l for l in text.splitlines() if l.rstrip().endswith("train.name=t1-V"))
    cfg = load_config("configs/voc_resnet50_8gpu.yaml", [t for t in line.split() if OVERRIDE.match(t)])
    assert (cfg.cpal.enabled, cfg.cpal.self_loss, cfg.inference.cam_source) == (True, True, "cam")


def test_documented_modules_exist():
    names = sorted({a for _, argv in workflow_calls() for a in argv
                    if re.fullmatch(r"(workflows|tune_spaces)\.\w+", a)})
    assert "workflows.train" in names
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    assert not missing, f"the guides document modules that do not exist: {missing}"


def test_guides_contain_no_secrets():
    for md in GUIDES + [DOCS / "config.md"]:
        text = md.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|aws_secret_access_key", text), md.name
