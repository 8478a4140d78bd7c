"""Everything that touches torch, transformers or ModelOpt (imported lazily by callers)."""
