"""The one door to ModelOpt: every use of its internals lives in this folder."""
