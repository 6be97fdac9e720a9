"""``specray plan``: placement arithmetic for models no machine here can hold.

Pure Python (no Ray, no torch): model and GPU figures in, TP / EP / PP
layouts, memory, decode step time and speculative speedup out.
"""
