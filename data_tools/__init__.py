"""Offline dataset tools: build shards in the pixelflow shard format (pixelflow.data.shard_format)."""
