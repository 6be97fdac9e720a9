"""A draft head trained per target on the target's own hidden states.

EAGLE-3 / DSpark style: one decoder layer of its own reads hidden states of
three target layers, reuses the target's frozen embedding and (reduced
vocabulary) LM head, and drafts γ tokens chained on its own outputs.
"""
