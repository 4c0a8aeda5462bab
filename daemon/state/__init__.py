"""The job state: the only SQL in the daemon. The queue API (enqueue, atomic claim with a
lease, transitions, journal, ledger), the schema and its migrations, the models, and the
mapping of OS/SQLite errors to ours. Imports no other stage."""
