"""Real servers the tests start themselves (SeaweedFS, Prometheus), on loopback, cleaned up after."""
