"""Rows of tokens shown with a value per token (top activating examples, per-token loss changes).

Token strings are ``saecircuits.models.tokens.token_pieces`` / ``token_string`` (leading spaces kept; a character
split over byte tokens is shown once, on its first piece, the others ``"continuation"`` with text ``""``).
"""

from __future__ import annotations

from pydantic import model_validator

from saecircuits.results._base import Float, Int, ResultsModel, Str, TokenKind, opt, req, same_length


class Example(ResultsModel):
    """One top activating example: a window of a corpus document with the feature's activation on each token."""

    doc_index: Int = opt("index of the document in the corpus")
    tokens: list[Str] = req("the window's tokens as strings, shape [T]")
    token_kinds: list[TokenKind] = opt("'text' | 'continuation' | 'special' per token, shape [T]")
    activations: list[Float] = req("the feature's activation per token, shape [T] (SAE feature units); null at a "
                                   "special token")
    max_activation: Float = opt("the largest activation in the window (SAE feature units)")

    @model_validator(mode="after")
    def _aligned(self) -> Example:
        same_length(self, "tokens", "activations")
        same_length(self, "tokens", "token_kinds")
        return self
