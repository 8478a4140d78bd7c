"""The shell around the pipeline: command line, run folders, sweeps."""
