"""The training objectives: the tile walk they share (tiles.py), symmetric InfoNCE with
Embedding Smoothing (infonce.py), the sigmoid loss (sigmoid.py), and the registry that names
them (registry.py). The package root's names are the public functions."""

from alignvl_scale.losses.infonce import align_vl_loss, align_vl_loss_with_stats
from alignvl_scale.losses.sigmoid import sigmoid_loss, sigmoid_loss_with_stats

__all__ = ["align_vl_loss", "align_vl_loss_with_stats", "sigmoid_loss", "sigmoid_loss_with_stats"]
