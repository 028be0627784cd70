"""The runtime: Kafka source, ring, decoder and worker threads, offsets, memory plan."""
