"""Names that become paths are checked whole (`fullmatch`): a trailing newline, which `re.match` with `$`
lets through, is refused with a clear error and creates nothing."""

from __future__ import annotations

import pytest

from klong.cli import main
from core.settings import Settings, Topics
from schemas.errors import ConfigError
from store.datasets import check_name, datasets_dir
from trainer.model_import import import_model, resolve_model_dir

BAD = ["nl\n", "nl\n\n", "ok/../x", "", "-lead", "a b"]


@pytest.mark.parametrize("name", BAD)
def test_bad_dataset_names_are_refused(name):
    with pytest.raises(ConfigError, match="dataset name"):
        check_name(name)


def test_dataset_build_with_a_trailing_newline_fails_and_creates_nothing(tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    assert main(["dataset", "build", "nl\n", "--kind", "sft", "--home", str(home)]) == 2
    assert "dataset name 'nl\\n' is not valid" in capsys.readouterr().err
    assert not datasets_dir(home).exists() or list(datasets_dir(home).iterdir()) == []


def test_model_names_and_topic_prefixes_with_a_newline_are_refused(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="--name 'm\\\\n'"):
        import_model(gguf, "m\n", tmp_path / "models")
    assert not (tmp_path / "models").exists()
    (tmp_path / "models" / "m").mkdir(parents=True)  # an existing model is not found through "m\n"
    with pytest.raises(ConfigError, match="is not a directory"):
        resolve_model_dir("m\n", tmp_path)
    with pytest.raises(ConfigError, match="topic prefix"):
        Topics("klong\n")
    with pytest.raises(ConfigError, match="topic prefix"):
        Settings.load(tmp_path, topic_prefix="../x")
    assert Topics("t.ok-1_2").rollouts == "t.ok-1_2.rollouts"
