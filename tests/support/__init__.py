"""What the tests share, as a library (``conftest.py`` keeps only fixtures).

* ``data``: the sandbox token, sizes, deterministic file contents, the reference content hash.
* ``waits``: ``wait_for`` (blocking) and ``wait_until`` (async), the one way to wait on a
  condition.
* ``runner``: the daemon as a test runs it: a config on disk, an in-process service, a real
  ``inboxd`` child process and its graceful stop.
* ``rig``: the reliability suites' readings of a running daemon (jobs, status, logs).
* ``faultproxy``: a TCP proxy that injects network faults (also a script for the benchmarks).
* ``hostile``: an HTTP server that answers the way a broken or hostile API would.
* ``emulators``: moto's S3 server and Azurite, with request logs.
"""
