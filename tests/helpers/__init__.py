"""Shared pieces of the test suite: tiny models from configs, the case table, the toy Trainer task, and the
worker scripts that torchrun / the legacy interpreter run (``python -m helpers.<worker>`` from ``tests/``)."""
