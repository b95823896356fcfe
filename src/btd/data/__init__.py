"""Data acquisition (virtual scanners, real-data loaders), preprocessing, patches and splits."""
