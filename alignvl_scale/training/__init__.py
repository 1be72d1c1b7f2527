"""A training run: the launch, its preflight, the engine, the loop, logging, feature extraction."""
