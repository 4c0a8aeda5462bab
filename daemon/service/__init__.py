"""The composition root: ``run`` builds the queue, watcher, workers, poller and metrics
and runs them in one task group; systemd notify, signals, the metrics endpoint."""
