"""The embedded virtual imaging trial: generated anatomy scanned by physically modelled scanners."""
