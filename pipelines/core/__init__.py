"""What every stage shares: the run directory, the Parquet store, atomic writes, the manifest,
image loading and batching, models, device and precision, config, options and timings."""
