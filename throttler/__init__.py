"""throttler: memory-aware aggregation of Parquet file groups on Dask distributed."""

__version__ = "0.1.0"
