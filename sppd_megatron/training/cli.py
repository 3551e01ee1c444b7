"""``sppd-megatron train CONFIG.yaml [dotted.key=value ...]`` (one process or under torchrun)."""

from __future__ import annotations

import warnings

from sppd_megatron.config import ConfigError, parse_config_command, report_error
from sppd_megatron.training.config import TrainConfig


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")
    from sppd_megatron.parallel.state import destroy
    from sppd_megatron.training.data import DataError

    try:
        cfg = parse_config_command("sppd-megatron train", TrainConfig, argv, __doc__, "optim.lr=1e-5")
        from sppd_megatron.training.trainer import train

        train(cfg)
    except (ConfigError, DataError) as exc:
        return report_error("sppd-megatron train", exc)
    finally:
        destroy()
    return 0
