"""scripts/train_world_classifier.py refuses, before any training, settings that would fail later and outputs
that would replace the shipped classifier or put the label file over the weights."""
import re

import pytest

from ldm.evaluation.world_classifier import WorldClassifier, save_classifier
from scripts import train_world_classifier
from tests.conftest import REPO


@pytest.mark.parametrize("flags, expected", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--batch_size", "1"], "--batch_size must be at least 2, got 1"),
    (["--eval_count", "0"], "--eval_count must be at least 1, got 0"),
    (["--out", "{tmp}/c.json"], "--out '.*c.json' must end in .safetensors \\(the label names go beside it as .json\\)"),
    (["--out", "{tmp}/old.safetensors"], "--out: '.*old.safetensors' already exists: pass another --out, or --force "
                                         "to replace it"),
    (["--out", "{tmp}/labels.safetensors"], "--out: '.*labels.json' already exists"),
])
def test_mistakes_and_existing_outputs_are_refused_before_training(tmp_path, capsys, flags, expected):
    save_classifier(WorldClassifier(), tmp_path / "old.safetensors")
    (tmp_path / "labels.json").write_text("{}")
    argv = ["--out", str(tmp_path / "new.safetensors")] + [flag.format(tmp=tmp_path) for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        train_world_classifier.parse_args(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(expected, error), error


def test_the_shipped_classifier_is_replaced_only_with_force(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        train_world_classifier.parse_args([])
    assert "world_classifier.safetensors' already exists" in capsys.readouterr().err
    assert train_world_classifier.parse_args(["--force"]).force
    save_classifier(WorldClassifier(), tmp_path / "old.safetensors")
    assert train_world_classifier.parse_args(["--out", str(tmp_path / "old.safetensors"), "--force"]).force
