"""multisniff: capture packets from every Kubernetes pod matched by a selector into one pcapng."""

__version__ = "0.1.0"
