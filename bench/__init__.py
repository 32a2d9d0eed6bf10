"""Benchmarks (not tests): numbers depend on the machine. A regular package so `bench.*` never resolves to a stray bench.py elsewhere on sys.path."""
