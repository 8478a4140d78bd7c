"""Fault and abuse tests, kept together so the next hostile round can extend them.

One module per class of fault (issue 21): what ``--force`` may remove, planted links, messages
from the network, signals, degenerate settings, unsolvable numbers, a full disk, the frontier's
monotonicity, file modes, tampered and impossible files. Each test fails on the code before the
fix it guards.
"""
