"""Data model, validation, world simulator, real-data ingest and point-in-time timelines."""
