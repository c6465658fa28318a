"""Island-side code: models, flow matching, encoders, training loop, sampler. Never imports `orchestrator`."""
