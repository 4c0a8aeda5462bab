"""Marple DB: its API client and models, the ingestion flow (server / single / multipart
upload), streams, and the target the engine calls."""
