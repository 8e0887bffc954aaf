"""The write side: CDC decoding, sync rules, the Redis op-log store, processor, compaction."""
