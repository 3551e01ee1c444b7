"""Checkpoint conversion between Hugging Face and Megatron (the only bridge between the two weight worlds).

- :mod:`mapping`: tensor mapping incl. TP split/merge; :mod:`hf_io`: safetensors read/write;
- :mod:`mcore_checkpoint`: the Megatron checkpoint format (shared with the trainer);
- :mod:`hf_to_mcore` / :mod:`mcore_to_hf`: streaming converters; :mod:`weight_sync`: in-memory export;
- :mod:`cli`: ``sppd-megatron convert``.
"""
