"""ServerApp, coordinator, run store, checkpoints and the control CLI."""
