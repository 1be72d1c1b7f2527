"""What every layer runs on: process groups, performance counters, DeepSpeed's op builds, logging,
seeds, and the one module for what the dependencies do not promise (compat)."""
