"""GOT-D pool selection: Sinkhorn potentials (ot.py), the calibrated gradient over a pool
(gotd.py), the baselines (baselines.py), input resolution (inputs.py), `sift select-pool` (select.py)."""
