"""``sppd-megatron run CONFIG.yaml [dotted.key=value ...]``: the whole self-training loop in a run directory.

Stages (sample -> score -> pairs -> SFT-PRM -> DPO-PRM -> step-DPO -> eval, per iteration) each
write ``run_dir/iter<k>/<stage>/manifest.json``. Re-running the same command skips finished
stages and resumes an interrupted one; a changed config is refused for stages already made.
"""

from __future__ import annotations

import argparse

from sppd_megatron.config import USER_ERRORS, report_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sppd-megatron run", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="RunConfig YAML (see docs/pipeline.md, configs/tiny-cpu/run.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. sample.K=8 iterations=2")
    args = parser.parse_args(argv)
    from sppd_megatron.pipeline.config import load_run_config
    from sppd_megatron.pipeline.runner import run_pipeline

    try:
        cfg = load_run_config(args.config, args.overrides)
        run_pipeline(cfg)
    except USER_ERRORS as exc:
        return report_error("sppd-megatron run", exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
