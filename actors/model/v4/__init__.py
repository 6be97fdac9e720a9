"""DeepSeek-V4 blocks: compressed sparse / heavily compressed / sliding-window
attention with their per-slot state, routed and hash MoE, hyper-connections
and the multi-token-prediction block. :class:`DecoderModel` picks them from
:class:`ModelConfig`."""
