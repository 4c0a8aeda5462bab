"""The older Marple API: its client and the target the engine calls."""
