"""Corpus: statistics of every feature over a corpus in one streaming pass (densities, top examples, co-occurrence, weight geometry)."""
