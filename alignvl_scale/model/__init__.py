"""The model: the towers (HF and offline), how they fine-tune, and the Align-VL head on top."""
