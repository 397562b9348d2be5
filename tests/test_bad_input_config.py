"""Bad input to the config system and the command line: one line naming the file or field,
exit code 2, nothing started; partial sections keep their defaults; overrides anywhere."""

import pytest
import yaml

from jaxlm.cli import build_parser, main, parse
from jaxlm.config import ConfigError, from_dict, load, read_yaml
from jaxlm.data.recipe import Recipe
from jaxlm.errors import DirectoryLock, LockedError
from jaxlm.loop import TrainConfig
from jaxlm.sweep import load_sweep_config

TRAIN = {
    "model": {"preset": "tiny", "vocab_size": 320},
    "data": {"dataset": "/nowhere", "sources": {"clean": 1.0}, "seq_len": 32, "batch_size": 8},
    "steps": 5,
    "tensorboard": False,
}


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"jaxlm {command}: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


# -- case 9: nested sections merge with their defaults ---------------------------------


def test_partial_read_section_keeps_the_documented_max_chars():
    recipe = from_dict(Recipe, {"sources": {"a": {"reader": "text", "paths": ["x"]}}, "read": {"invalid_utf8": "drop"}})
    assert recipe.read.invalid_utf8 == "drop" and recipe.read.max_chars == 2_000_000


def test_partial_section_merges_with_a_non_class_default():
    import dataclasses

    from jaxlm.config import ModelConfig

    @dataclasses.dataclass(frozen=True)
    class Outer:
        model: ModelConfig = ModelConfig(d_model=64, n_heads=4, mlp_hidden=128)

    merged = from_dict(Outer, {"model": {"n_layers": 3}})
    assert (merged.model.d_model, merged.model.n_heads, merged.model.mlp_hidden, merged.model.n_layers) == (64, 4, 128, 3)
    # a preset inside the section replaces the field default as the base
    assert from_dict(Outer, {"model": {"preset": "tiny"}}).model.d_model == 32


# -- case 10: duplicate keys -----------------------------------------------------------


def test_duplicate_yaml_key_is_an_error_naming_key_and_lines(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text("steps: 5\nmodel:\n  preset: tiny\n  d_model: 32\n  d_model: 64\n")
    with pytest.raises(ConfigError, match=r"line 5: duplicate key 'd_model' \(first given on line 4\)"):
        read_yaml(path)
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys, "train")
    assert str(path) in line and "duplicate key 'd_model'" in line
    assert not (tmp_path / "run").exists()


def test_duplicate_key_inside_an_override_value():
    with pytest.raises(ConfigError, match="override .*duplicate key 'clean'"):
        load(TrainConfig, None, ["data={dataset: x, sources: {clean: 0.5, clean: 1.0}}"])


# -- case 13: a config file that is not UTF-8 text --------------------------------------


def test_non_utf8_config_file(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_bytes(b"steps: 5\nmodel: \xff\xfe tiny\n")
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys, "train")
    assert str(path) in line and "not UTF-8" in line and "offset 16" in line


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "absent.yaml"), "--run-dir", str(tmp_path / "run")]) == 2
    assert "absent.yaml" in one_error_line(capsys, "train")


# -- case 12: sweep settings checked against the model before any run starts ------------


def sweep_yaml(tmp_path, **changes) -> str:
    config = {"name": "t", "recipe": str(tmp_path / "recipe.yaml"), "train": {**TRAIN, "data": {"seq_len": 32, "batch_size": 8}},
              "clean": "clean", "toxic": "toxic", "shares": [0.0, 0.25], "seeds": [0], "iti": {"k": 4}, **changes}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize(
    "override, field",
    [
        ("iti.k=400", "iti.k: 400 heads asked for, but the model has 8"),  # tiny: 2 layers x 4 heads
        ("eval.max_new_tokens=64", "eval.max_new_tokens: 64 leaves no room"),
        ("eval.batch_size=0", "eval.batch_size: expected a positive integer"),
        ("eval.scorer=perspektive", "eval.scorer: unknown toxicity scorer"),
        ("probe.data=toxigen:limit=lots", "probe.data:"),
        ("probe.val_fraction=1.0", "probe.val_fraction"),
        ("train.model.n_heads=3", "model.n_heads"),
        ("train.steps=abc", "train.steps: expected a positive integer, got 'abc'"),
        ("tagged=[{kind: meda, share: 0.1, every: 0}]", "tagged[meda].every"),
    ],
)
def test_sweep_refuses_bad_stage_settings_before_training(tmp_path, capsys, override, field):
    path = sweep_yaml(tmp_path)
    load_sweep_config(path)  # the config itself is fine
    out = tmp_path / "out"
    assert main(["sweep", path, "--out", str(out), override]) == 2
    line = one_error_line(capsys, "sweep")
    assert path in line and field in line
    assert not out.exists()  # nothing prepared, nothing trained


def test_sweep_unknown_stage(tmp_path, capsys):
    path = sweep_yaml(tmp_path)
    assert main(["sweep", path, "--out", str(tmp_path / "out"), "--stages", "train,evaluate"]) == 2
    assert "--stages: unknown stage(s) evaluate" in one_error_line(capsys, "sweep")


# -- case 14: overrides anywhere on the line, for every subcommand that takes them -------


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "c.yaml", "a=1", "--run-dir", "r", "b.c=2", "--no-progress"],
        ["data", "prepare", "r.yaml", "a=1", "--out", "o", "b.c=2"],
        ["data", "inspect", "c.yaml", "a=1", "--batches", "3", "b.c=2"],
        ["sweep", "s.yaml", "a=1", "--out", "o", "b.c=2", "--no-progress"],
        ["toy", "--out", "o", "a=1", "--quick", "b.c=2"],
    ],
)
def test_overrides_are_accepted_anywhere(argv):
    args = parse(build_parser(), argv)
    assert args.overrides == ["a=1", "b.c=2"]


def test_overrides_after_options_reach_the_run(tmp_path, capsys):
    """The README's own form: ``jaxlm train CONFIG --run-dir DIR key=value``."""
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(TRAIN))
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run"), "model.n_heads=3"]) == 2
    assert "model.n_heads" in one_error_line(capsys, "train")  # the override was applied, and refused


def test_unknown_arguments_are_still_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(build_parser(), ["info", "steps=3"])  # info takes no overrides
    assert exc.value.code == 2 and "unrecognized arguments: steps=3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(build_parser(), ["train", "c.yaml", "--run-dir", "r", "--stepz", "3"])


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(b"\xff")
    with pytest.raises(ConfigError):
        main(["sweep", str(path), "--out", str(tmp_path / "out"), "--debug"])
    monkeypatch.setenv("JAXLM_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["sweep", str(path), "--out", str(tmp_path / "out")])


# -- the directory lock every writer takes ----------------------------------------------


def test_directory_lock_names_the_holder_and_is_released(tmp_path):
    import os

    with DirectoryLock(tmp_path / "run", "training run"):
        with pytest.raises(LockedError, match=rf"in use by another training run \(pid {os.getpid()}\)"):
            DirectoryLock(tmp_path / "run", "training run").acquire()
    DirectoryLock(tmp_path / "run", "training run").acquire().release()  # free again


def test_a_second_sweep_into_one_directory_is_refused(tmp_path, capsys):
    import os

    path = sweep_yaml(tmp_path)
    out = tmp_path / "out"
    with DirectoryLock(out, "sweep"):
        assert main(["sweep", path, "--out", str(out), "--no-progress"]) == 2
    assert f"in use by another sweep (pid {os.getpid()})" in one_error_line(capsys, "sweep")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the running sweep's files untouched
