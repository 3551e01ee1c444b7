"""Recipe planning without GPUs: known architectures, layout validation and per-GPU memory estimates.

Nothing here imports Megatron except :mod:`sppd_megatron.planning.measure`, which checks the
estimates against the tensors of a real (tiny, CPU) training run.
"""
