from pathlib import Path

import pytest

from ldct_tf import config

# Experiment configs (ldct_tf.config); configs/audit.yaml is the audit's thresholds file (ldct_tf.audit), tested there.
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml") if p.name != "audit.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = config.load(path)
    assert cfg.train.steps > 0 and cfg.data.patch_size % (2 ** cfg.model.depth) == 0


def test_smoke_config_is_tiny():
    cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
    assert (cfg.data.patch_size, cfg.model.base_filters, cfg.model.depth) == (32, 8, 2)
    assert cfg.loss.vgg_weights == "none"


def test_overrides_are_typed():
    cfg = config.load(None, ["train.steps=12", "train.batch_size=3", "model.attention=false",
                             "loss.perceptual_layers=block1_conv2,block2_conv2", "loss.vgg_weights_path=none",
                             "train.generator_lr=1e-4", "tuning.space.model.depth=[2,3]"])
    assert cfg.train.steps == 12 and cfg.train.batch_size == 3 and cfg.model.attention is False
    assert cfg.loss.perceptual_layers == ["block1_conv2", "block2_conv2"]
    assert cfg.loss.vgg_weights_path is None and cfg.train.generator_lr == pytest.approx(1e-4)
    assert cfg.tuning.space == {"model": {"depth": [2, 3]}}


@pytest.mark.parametrize("override, match", [
    ("train.stepz=3", "unknown key 'train.stepz'"),
    ("trian.steps=3", "unknown config section"),
    ("train.steps=many", "expected int"),
    ("train.steps=2.5", "expected int"),
    ("model.attention=maybe", "true/false"),
    ("steps", "section.key=value"),
])
def test_bad_overrides_say_what_is_wrong(override, match):
    with pytest.raises(config.ConfigError, match=match):
        config.load(None, [override])


def test_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depht: 3\n")
    with pytest.raises(config.ConfigError, match="bad.yaml.*depht"):
        config.load(bad)
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")


def test_yaml_round_trip(tmp_path):
    cfg = config.load(None, ["model.depth=2", "loss.cycle=7"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert config.load(path).to_dict() == cfg.to_dict()
