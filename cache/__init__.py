"""On-disk formats: HDF5 embedding stores, the Parquet index, fingerprints."""
