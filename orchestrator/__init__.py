"""The coordinator: stages, the pipeline state machine, islands and scheduling, the `ddm` CLI."""
