"""specray.deploy."""
