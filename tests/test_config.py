import pytest

from engine.cli import main
from engine.config import IngestConfig, load_config, parse_set_flags
from engine.errors import SiftError


def test_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "ingest.yaml"
    cfg_file.write_text("max_chars: 100\nencoding: latin-1\ncolumns:\n  text: body\n")
    cfg = load_config(IngestConfig, cfg_file, {"max_chars": 50, "runtime.num_cpus": 1})
    assert (cfg.max_chars, cfg.encoding, cfg.columns.text, cfg.runtime.num_cpus) == (50, "latin-1", "body", 1)


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("max_char: 10\n")
    with pytest.raises(SiftError, match=r"unknown key 'max_char' \(did you mean 'max_chars'\?\)"):
        load_config(IngestConfig, cfg_file)


def test_unknown_nested_key_is_named():
    with pytest.raises(SiftError, match=r"unknown key 'columns.txt' \(did you mean 'columns.text'\?\)"):
        load_config(IngestConfig, None, {"columns.txt": "body"})


def test_wrong_type_names_the_key():
    with pytest.raises(SiftError, match=r"key 'max_chars': Input should be a valid integer.*got 'lots'"):
        load_config(IngestConfig, None, {"max_chars": "lots"})


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_chars: [1,\n")
    with pytest.raises(SiftError, match="is not valid YAML at line"):
        load_config(IngestConfig, bad)
    with pytest.raises(SiftError, match="config file not found"):
        load_config(IngestConfig, tmp_path / "nope.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(SiftError, match="must hold a mapping of keys, not a list"):
        load_config(IngestConfig, listing)


def test_set_flags_are_typed():
    assert parse_set_flags(["a=3", "b=true", "c=[x, y]", "d=text"]) == {"a": 3, "b": True, "c": ["x", "y"], "d": "text"}
    with pytest.raises(SiftError, match="--set expects KEY=VALUE"):
        parse_set_flags(["novalue"])


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    code = main(["ingest", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "max_chars=-3"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0
    assert err.startswith("sift: error: config error in command line: key 'max_chars'")


def test_shipped_example_configs_validate():
    from pathlib import Path

    from engine.config import GradsConfig, SelectPoolConfig

    root = Path(__file__).resolve().parent.parent / "configs"
    assert load_config(SelectPoolConfig, root / "select_pool.yaml").method == "gotd"
    assert load_config(GradsConfig, root / "featurize_grads.yaml").dim == 400
