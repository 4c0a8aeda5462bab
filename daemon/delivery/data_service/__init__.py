"""The spreadsheet data service: its OAuth-signed client and the target the engine calls."""
