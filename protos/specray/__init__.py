"""specray.protos.specray: generated code of the ``specray.*`` proto packages."""
