"""Intake: files appear in the inbox (start-up scan, inotify/watchfiles events), are
watched until complete (writer closed, size settled), routed to a destination and enqueued.
Never touches the network; uses only ``state``."""
