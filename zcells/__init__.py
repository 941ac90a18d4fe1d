"""zcells: a brokerless tree of autonomous compute cells over ZeroMQ."""

__version__ = "0.1.0"
