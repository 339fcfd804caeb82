"""The command-line checks every script shares: devices against the machine, counts, configs."""
import pytest
import torch
from omegaconf import OmegaConf

from ldm.cli import parse_device, read_config, require_at_least
from tests.conftest import TINY_SD


def test_devices_are_checked_against_the_machine(monkeypatch):
    assert parse_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)
    assert parse_device("cuda:1") == torch.device("cuda:1") and parse_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match="--device 'cuda:2': this machine's cuda devices are cuda:0 to cuda:1"):
        parse_device("cuda:2")
    with pytest.raises(ValueError, match="--device 'mps': this machine has no usable mps device: use --device cuda"):
        parse_device("mps")
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)
    with pytest.raises(ValueError, match="--gpu 'cuda': this machine has no usable cuda device: use --gpu cpu"):
        parse_device("cuda", flag="--gpu")


def test_config_mistakes_are_one_line_errors(tmp_path, tiny_sd_ckpt):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "lightning.yaml").write_text("lightning: {}\n")
    for path, expected in [(tmp_path / "bad.yaml", "is not valid YAML"),
                           (tiny_sd_ckpt, "is not a YAML text file .*a checkpoint"),
                           (tmp_path, "is a folder"),
                           (tmp_path / "none.yaml", "does not exist"),
                           (tmp_path / "lightning.yaml", "has no model.params section: pass an inference config")]:
        with pytest.raises(ValueError if expected != "does not exist" else FileNotFoundError, match=expected) as info:
            read_config(str(path), flag="--base")
        assert "\n" not in str(info.value)


def test_counts_below_the_minimum_name_their_flag():
    require_at_least(1, n_samples=1, n_iter=None)  # None: not given
    with pytest.raises(ValueError, match="^--n_iter must be at least 1, got 0$"):
        require_at_least(1, n_samples=3, n_iter=0, batch_size=-1)


def test_a_misspelt_key_in_a_generation_config_is_named_before_the_model_loads(tmp_path):
    config = OmegaConf.load(TINY_SD)
    config.model.params.personalization_config.params.num_vectors_per_tokens = 4
    OmegaConf.save(config, tmp_path / "typo.yaml")
    with pytest.raises(ValueError, match="'model.params.personalization_config.params.num_vectors_per_tokens' is not "
                                         "a setting of EmbeddingManager .*did you mean 'num_vectors_per_token'"):
        read_config(str(tmp_path / "typo.yaml"))
