"""Reading training data: the shard format, streaming loader, image decoding and stage planning."""
