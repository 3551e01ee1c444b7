"""``sppd-megatron train CONFIG.yaml [dotted.key=value ...]`` (one process or under torchrun)."""

from __future__ import annotations

import os
import warnings

from sppd_megatron.config import USER_ERRORS, parse_config_command, report_error
from sppd_megatron.training.config import TrainConfig


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")
    from sppd_megatron import locking
    from sppd_megatron.parallel.state import destroy

    held = None
    try:
        cfg = parse_config_command("sppd-megatron train", TrainConfig, argv, __doc__, "optim.lr=1e-5")
        if int(os.environ.get("RANK", "0") or 0) == 0:  # rank 0 holds OUTPUT_DIR for the whole job
            held = locking.acquire(cfg.output_dir)
        from sppd_megatron.training.trainer import train

        train(cfg)
    except USER_ERRORS as exc:
        return report_error("sppd-megatron train", exc)
    finally:
        destroy()
        if held is not None:
            locking.release(held)
    return 0
