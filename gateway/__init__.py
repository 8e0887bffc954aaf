"""The read side: auth, PowerSync sync streams, notification hub, probes, metrics."""
