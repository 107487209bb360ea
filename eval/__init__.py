"""The shared evaluation suite: every decomposer scored the same way.

reconstruction  streaming reconstruction and sparsity metrics (SAEBench core definitions)
downstream      next-token loss with the dictionary spliced into the model (CE and KL scores)
feature_cards   per-feature statistics, top contexts and vocabulary projections (JSON + static HTML)
steering        steering effectiveness at equal KL, judged without a language-model judge
report          metrics.json, report.md and plots
suite           evaluates every decomposer of a run (`dictlearn eval CONFIG.toml`)
"""
