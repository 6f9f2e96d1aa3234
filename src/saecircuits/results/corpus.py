"""One SAE's corpus statistics (``results["saes"][i]["corpus_stats"]``): a single streaming pass over the corpus's
documents (analysis/corpus/statistics.py)."""

from __future__ import annotations

from pydantic import model_validator

from saecircuits.results._base import Float, Int, ResultsModel, TokenValue, fail, opt, req
from saecircuits.results.tokens import Example


class TopStory(ResultsModel):
    """A corpus position where the feature fires most."""

    doc_index: Int = req("document index in the corpus")
    position: Int = req("token position in the document")
    activation: Float = req("the feature's activation there (SAE feature units)")


class CorpusFeature(ResultsModel):
    """One listed feature over the corpus."""

    feature: Int = req("feature index, 0 <= feature < d_sae")
    density: Float = req("fraction of corpus tokens where the feature is active, in [0, 1]")
    fire_count: Int = opt("number of tokens where it is active")
    max_activation: Float = req("largest activation over the corpus (SAE feature units)")
    mean_when_active: Float = opt("mean activation where active (SAE feature units)")
    above_count: Int = opt("tokens where it is above token_fraction x its corpus maximum")
    top_tokens: list[TokenValue] = req("[token, count] pairs: the input tokens most often above the threshold")
    top_token_share: Float = opt("top token's count / above_count, in [0, 1]; null when none")
    activation_log10_counts: list[Int] = opt("histogram of log10 activation, one count per bin of "
                                             "activation_log10_edges")
    top_examples: list[Example] = opt("top activating examples (every listed feature with a recorded effect)")
    top_stories: list[TopStory] = opt("where it fires most (the shown top-ranked features only)")
    band_examples: dict[str, list[Example]] = opt("band name -> examples near that fraction of its maximum (the "
                                                  "shown top-ranked features only)")


class CorpusStats(ResultsModel):
    """Densities, histograms and top tokens of the SAE's features over the corpus."""

    n_docs: Int = req("documents read")
    n_tokens: Int = req("tokens read (special positions left out)")
    l0: Float = req("mean active features per token over the corpus")
    l0_counts: list[Int] = opt("l0_counts[j]: tokens with exactly j active features, shape [max L0 + 1]")
    n_dead: Int = opt("features never active over the corpus")
    density_log10_edges: list[Float] = opt("bin edges of log10 density, shape [B + 1]")
    density_log10_counts: list[Int] = opt("features per log10-density bin, shape [B]")
    activation_log10_edges: list[Float] = opt("bin edges of log10 activation, shape [B' + 1]")
    token_fraction: Float = opt("token counts count a feature's tokens above this fraction of its corpus maximum")
    bands: dict[str, Float] = opt("example band name -> fraction of a feature's corpus maximum, e.g. "
                                  "{'upper': 0.667, 'middle': 0.333, 'lower': 0.1}")
    features: list[CorpusFeature] = req("the listed features")

    @model_validator(mode="after")
    def _histograms(self) -> CorpusStats:
        e, c = self.density_log10_edges, self.density_log10_counts
        if e is not None and c is not None and len(c) != len(e) - 1:
            fail("{p0} needs one count per bin (len(density_log10_edges) - 1).", ("density_log10_counts",))
        n_bins = len(self.activation_log10_edges) - 1 if self.activation_log10_edges is not None else None
        for j, fe in enumerate(self.features):
            dens = fe.density
            if dens is not None and not -1e-9 <= dens <= 1 + 1e-9:
                fail(f"{{p0}} = {dens} is not in [0, 1].", ("features", j, "density"))
            counts = fe.activation_log10_counts
            if n_bins is not None and counts is not None and len(counts) != n_bins:
                fail(f"{{p0}} needs {n_bins} counts.", ("features", j, "activation_log10_counts"))
        return self
