"""alignvl-scale: distributed Align-VL vision-language alignment on DeepSpeed ZeRO."""

__version__ = "0.1.0"

# The public API, imported on first use (importing the package stays cheap for the CLI).
__all__ = ["align_vl_loss", "align_vl_loss_with_stats", "sigmoid_loss", "sigmoid_loss_with_stats",
           "retrieval_metrics", "load_encoder", "load_config", "RunConfig"]
_HOMES = {"align_vl_loss": "losses", "align_vl_loss_with_stats": "losses", "sigmoid_loss": "losses",
          "sigmoid_loss_with_stats": "losses", "retrieval_metrics": "evaluation.metrics",
          "load_encoder": "export", "load_config": "config", "RunConfig": "config"}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"alignvl_scale.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'alignvl_scale' has no attribute {name!r}")
