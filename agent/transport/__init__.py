"""From the training thread to the wire: sinks, the batcher thread, the HTTP sender and poster, the disk spool, the file sink."""
