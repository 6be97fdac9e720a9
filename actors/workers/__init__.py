"""Plain worker classes that host actors/ components in their own process.

Pure torch: the Ray wrappers that place them live in ``specray.cluster``.
"""
