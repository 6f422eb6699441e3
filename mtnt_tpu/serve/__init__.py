"""A trained workdir served as a web page and an HTTP API (python -m mtnt_tpu.serve)."""
