"""Training, calibration and evaluation text data."""
