"""Pure logic (no torch): formats, ranking, statistics, health, diff, batching rules."""
