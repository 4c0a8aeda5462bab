"""The network boundary: the one place HTTP clients are built (TLS, pools, timeouts, the
network backend), answers are read and turned into our errors, secrets are scrubbed; plus
listen addresses and the bandwidth limits. Imports no other stage."""
