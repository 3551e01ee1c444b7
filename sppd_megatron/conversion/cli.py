"""``sppd-megatron convert hf-to-mcore|mcore-to-hf``: checkpoint conversion between HF and Megatron.

Wrong inputs (no config.json, an unsupported architecture, a TP size that does not divide the heads,
a checkpoint of a different model) end as one line, ``sppd-megatron convert: error: ... <what to do>``, and
exit status 2.
"""

from __future__ import annotations

import argparse
import time

from sppd_megatron.config import USER_ERRORS, report_error


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sppd-megatron convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="direction", required=True)
    h = sub.add_parser("hf-to-mcore", help="Hugging Face directory -> sppd-megatron dist checkpoint")
    h.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + safetensors)")
    h.add_argument("--out", required=True, help="output checkpoint directory")
    h.add_argument("--tp", type=int, default=1, help="tensor parallel size to validate and record (loads at any)")
    h.add_argument("--pp", type=int, default=1, help="pipeline parallel size to validate and record (loads at any)")
    h.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="stored weights: auto = the source's torch_dtype (bf16 stays bf16; fp32 and fp16 become fp32)")
    h.add_argument("--mapper", choices=["builtin", "bridge"], default="builtin",
                   help="builtin: the streaming mapping (tested, CPU or GPU); bridge: megatron-bridge, "
                        "under torchrun --nproc-per-node TP*PP on a GPU machine with megatron-bridge installed")
    h.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    m = sub.add_parser("mcore-to-hf", help="sppd-megatron checkpoint -> Hugging Face directory")
    m.add_argument("--ckpt", required=True, help="sppd-megatron checkpoint directory (with sppd_model.json)")
    m.add_argument("--out", required=True, help="output HF directory")
    m.add_argument("--hf-template", default=None, help="HF directory of the same model: config.json and tokenizer")
    m.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: the checkpoint's dtype")
    m.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def _hf_to_mcore(args) -> str:
    from sppd_megatron.conversion.hf_to_mcore import HfToMcoreOptions, convert_hf_to_mcore

    options = HfToMcoreOptions(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp, dtype=args.dtype,
        overwrite=args.overwrite,
    )
    if args.mapper == "bridge":
        from sppd_megatron.conversion.bridge import convert_hf_to_mcore_with_bridge

        return str(convert_hf_to_mcore_with_bridge(args.hf, args.out, options))
    return str(convert_hf_to_mcore(args.hf, args.out, options))


def _mcore_to_hf(args) -> str:
    from sppd_megatron.conversion.mcore_to_hf import McoreToHfOptions, convert_mcore_to_hf

    options = McoreToHfOptions(
        hf_template=args.hf_template, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite
    )
    return str(convert_mcore_to_hf(args.ckpt, args.out, options))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    from sppd_megatron.locking import locked

    try:
        with locked(args.out):  # one writer per output directory
            out = _hf_to_mcore(args) if args.direction == "hf-to-mcore" else _mcore_to_hf(args)
    except USER_ERRORS as exc:
        return report_error("sppd-megatron convert", exc)
    print(f"wrote {out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
