"""Thin wrapper: ``python tools/convert.py hf-to-mcore|mcore-to-hf ...`` = ``sppd-megatron convert ...``."""

from sppd_megatron.conversion.cli import main

if __name__ == "__main__":  # dist-checkpoint writers may re-import __main__: keep the guard
    raise SystemExit(main())
