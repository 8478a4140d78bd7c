"""One module per pipeline stage, named after it."""
