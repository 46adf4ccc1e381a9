"""Storage: the capture writer, its backends (Zarr v3, HDF5) and chunk codecs."""
