"""Distributed autoencoders for tabular Parquet data: ingest with Ray Data, train with Ray Train, score back to Parquet."""

__version__ = "0.1.0"
