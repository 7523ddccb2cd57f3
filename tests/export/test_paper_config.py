"""configs/paper.yaml loads and carries the lessons of issue 25 (item 6)."""

from ldct_tf import config
from tests.conftest import REPO


def test_paper_config_loads_with_the_lessons():
    cfg = config.load(REPO / "configs" / "paper.yaml")
    assert cfg.model.norm == "none" and cfg.model.disc_norm == "none"
    assert cfg.model.disc_input in ("highpass", "both")
    assert cfg.data.kernel_matched
    assert cfg.loss.identity < config.LossConfig().identity and cfg.loss.identity < cfg.loss.cycle
