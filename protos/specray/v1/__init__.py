"""specray.v1 protos: ``generation.proto``, ``admin.proto`` and their generated
stubs (do not edit the stubs; run ``python -m specray.protos.generate``)."""
