"""sppd-megatron: self-training with process preference learning on Megatron-core."""

__version__ = "0.1.0"
