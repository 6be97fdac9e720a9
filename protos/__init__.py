"""specray.protos."""
