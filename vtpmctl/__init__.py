"""Run virtual TPMs for virtual machines and move their state safely."""

__version__ = "0.1.0"
