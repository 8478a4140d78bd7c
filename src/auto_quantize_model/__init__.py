"""Per-layer quantization sensitivity of (vision-)language models with ModelOpt AutoQuant."""
