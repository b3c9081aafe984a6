"""lit-anomaly: unsupervised visual anomaly detection for industrial inspection."""

__version__ = "0.2.0"
