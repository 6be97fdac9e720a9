"""DSpark: a parallel block drafter with a Markov head and a confidence head,
loading DeepSpec's checkpoint format."""
