"""alignvl-scale: distributed Align-VL vision-language alignment on DeepSpeed ZeRO."""

__version__ = "0.1.0"
