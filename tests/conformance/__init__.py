"""Differential conformance: the ONNX backend test suite through every lossless pass.

harness.py collects the cases and runs one case through every pass configuration; test_backend.py
runs a fixed sample in the default test run and the full sweep under `-m slow`; run.py runs the
full sweep and writes summary.md (and summary.json beside it).
"""
