"""Code that runs inside workers: model, TP layers, KV cache, sampling, drafters.

Pure torch. Never imports ``specray.cluster`` or ``specray.deploy``.
"""
