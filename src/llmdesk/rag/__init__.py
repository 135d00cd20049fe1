"""Your documents: ingest, chunk, embed, index (SQLite FTS5 + sqlite-vec), search, and answers that
cite their sources, with retrieved text kept as quoted data (never as instructions)."""
