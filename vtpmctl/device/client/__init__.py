"""The client side of the swtpm-compatible device: transports, ControlClient, TARGET strings."""
