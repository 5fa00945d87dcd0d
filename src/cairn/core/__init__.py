"""Pure building blocks: ids, digests, statuses, errors and the graph spec. No I/O here."""
