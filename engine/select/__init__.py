"""Selection methods: GOT-D (ot.py) and its baselines (baselines.py) over a candidate pool."""
