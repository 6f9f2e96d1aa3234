"""Readouts: what a component or feature writes towards the answer (DLA, DFA, SAE-error DLA, activation-scaled DLA, token boosts)."""
