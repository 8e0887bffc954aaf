"""End-to-end tests driving the official PowerSync Node client (see powersync_client.py)."""
