"""The engine: workers claim jobs and run deliveries through a target, the poller follows
imports to their end, disposal and retention tidy delivered files, one hold for all workers
when the service is in trouble. Uses ``state``, ``delivery`` and ``net``."""
