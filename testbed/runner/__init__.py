"""Running scenarios: process supervision, run directories, the local and Mininet backends, the orchestrator."""
