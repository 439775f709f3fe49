"""max_position_embeddings bounds seq_length only for learned absolute positions (bigcode), not for glm2's rotary
positions; a model-field error points at the line (or flag) of the field it names."""
import pytest

from megaocto.config.base import ConfigError
from megaocto.config.loader import load_run_config
from megaocto.config.model import ModelConfig


def test_rotary_glm2_is_not_bounded_by_max_position_embeddings():
    cfg = ModelConfig.from_preset("tiny-glm2", seq_length=96, max_position_embeddings=64)
    assert cfg.seq_length == 96
    with pytest.raises(ConfigError, match="exceeds max_position_embeddings"):
        ModelConfig.from_preset("tiny-bigcode", seq_length=96, max_position_embeddings=64)


def test_model_field_error_points_at_the_field_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: tiny-bigcode\n  vocab_size: 4096\n  seq_length: 96\n"
                    "train:\n  iters: 2\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(str(path))
    assert str(e.value).startswith(f"{path}:4: "), e.value  # the seq_length line, not the 'model:' line
    with pytest.raises(ConfigError) as e:
        load_run_config(str(path), ["--model.max_position_embeddings", "32", "--model.seq_length", "64"])
    assert str(e.value).startswith("command line --model.seq_length: "), e.value
