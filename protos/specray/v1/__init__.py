"""specray.v1 protos: ``generation.proto`` and its generated stubs (do not edit the stubs;
run ``python -m specray.protos.generate``)."""
