"""``sppd-megatron train CONFIG.yaml [dotted.key=value ...]`` (one process or under torchrun)."""

from __future__ import annotations

import argparse
import sys
import warnings

from sppd_megatron.config import ConfigError, load_config
from sppd_megatron.training.config import TrainConfig


def parse_train_config(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="sppd-megatron train", description=__doc__)
    parser.add_argument("config", help="YAML recipe (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. optim.lr=1e-5")
    args = parser.parse_args(argv)
    return load_config(TrainConfig, args.config, args.overrides)


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")
    from sppd_megatron.training.data import DataError

    try:
        cfg = parse_train_config(argv)
        from sppd_megatron.training.trainer import train

        train(cfg)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        from sppd_megatron.parallel.state import destroy

        destroy()
    return 0
