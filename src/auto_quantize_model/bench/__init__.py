"""The benchmark harness behind ``aqm bench``; not imported by the library's core."""
