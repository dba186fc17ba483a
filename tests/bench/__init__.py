"""Throughput benchmarks for pipes (``make bench``); not collected by pytest."""
