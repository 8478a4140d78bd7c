"""Sweeps: one pipeline file, many runs.

:mod:`.points` expands a ``[sweep]`` table into checked points, runs them and writes the index;
:mod:`.session` runs them on copies of one loaded model, sharing calibration and searches;
:mod:`.workers` spreads them over ``torchrun`` workers that talk through the rendezvous store;
:mod:`.runs` is the sweep folder's lifecycle (open, run the points, record), in one process or
as one of those workers.
"""
