"""``specray cluster check``: all-reduce bandwidth and latency of every node
and across nodes, in nccl-tests' terms, against operator thresholds."""
