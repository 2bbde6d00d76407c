"""The version, in a module of its own so that the pcap core can name it without the package."""

__version__ = "0.1.0"
