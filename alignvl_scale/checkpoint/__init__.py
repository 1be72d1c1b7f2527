"""The run folder and its checkpoints: planning a resume, saving and loading every stateful part
through one manager, retention, demotion and the universal conversion."""
