"""Benchmarks of orangepill-bridge against the local RabbitMQ (``python -m bench``, ``python -m bench outage``)."""
