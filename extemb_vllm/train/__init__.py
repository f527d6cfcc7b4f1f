"""Training: the two-stream auto-regressive objective and the `extemb train` loop."""
