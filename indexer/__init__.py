"""clipsearch write side: sources, the embed pipeline, the shard writer and commits."""
