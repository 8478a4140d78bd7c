"""The benchmark behind ``aqm bench``: an optional part of the package that the library never imports.

``settings`` (what to run, built from the stages' specs), ``command`` (the flags, torch-free, for
the CLI's ``bench`` subcommand), ``results`` (records, agreement statistics, tables; pure) and
``harness`` (the runs themselves: torch, ModelOpt, GPU memory tracking).
"""
