"""specray.cluster."""
