"""Teachers reached over the network: one adapter per API dialect, a pool over replicas, the compatibility check."""
