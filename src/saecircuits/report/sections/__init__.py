"""The report's sections: each module computes what its part of the page shows (numbers formatted, table rows,
figure specs) and the Jinja2 templates in ``assets/report/templates`` show it, with autoescaping on.

- :mod:`.common`: formatting, tables, figures, the name of the page part being drawn;
- :mod:`.overview`: summary, the run, the checks, the feature browser's count;
- :mod:`.dla`: direct logit attribution, the appendix;
- :mod:`.sae`: one SAE's summary, quality, top features, effects, multi-feature ablation, examples;
- :mod:`.evidence`: SAE-error DLA, feature details, upstream ablation, activation-scaled DLA;
- :mod:`.study`: the rest of the reference study, the layer comparison;
- :mod:`.circuit`: the feature circuit.
"""
