"""The serving side of the swtpm-compatible device: sockets, CUSE and the daemon process."""
