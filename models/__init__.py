"""Model builders for tests and benches, and small real sample models (see models/README.md)."""
