"""Steering effectiveness, judged without a language-model judge: every vector at the same KL budget.

    from dictlearn.eval.steering import SteeringConfig, evaluate_steering
    result = evaluate_steering(model, tokenizer, decomposers, cache, cfg)  # the JSON of steering.json

Each decomposer's sampled live features (does steering raise the feature itself?) and, per labelled concept,
its best detecting feature, DiffMean and random directions (does steering make the text on-topic, judged by a
probe and a lexical classifier that must agree, behind fluency gates?) are calibrated to the same KL targets
and compared with random directions at equal KL. The modules, one job each:

  config.py    SteeringConfig, the [eval.steering] options
  prompts.py   the judge prompts and batched generation by rows (per-row steering and random stream)
  reading.py   reading text back with the unsteered model (pooled activations, per-token loss)
  corpus.py    the labelled corpus: documents, split by document, token windows read by the model
  features.py  a decomposer's side: steering site, vocabulary projection, firing statistics, detection
  judges.py    the concept judges (probe, naive Bayes) and the fluency reference and gates
  stats.py     rate tests, detection AUC, the combined score
  runs.py      calibrated vectors and the cached steered runs of one evaluation
  curves.py    feature, concept and random-direction curves over (sign, KL target)
  records.py   typed results; SteeringResult.to_json() is steering.json's shape
  page.py      every judged continuation: continuations.jsonl and the side-by-side index.html
  evaluate.py  the orchestration

Cost (generation dominates): per decomposer (n_features + len(concepts)) x len(kl_targets) x len(signs)
conditions of n_prompts x samples_per_prompt continuations, plus the same per DiffMean and n_random per
hookpoint, all generated together in batches of batch_size rows (and read back together), so the cost is
about proportional to the number of generated tokens; see docs/steering.md for measured figures.
"""

from dictlearn.eval.steering.config import SteeringConfig
from dictlearn.eval.steering.evaluate import evaluate_steering, run_steering
from dictlearn.eval.steering.records import SteeringResult

__all__ = ["SteeringConfig", "SteeringResult", "evaluate_steering", "run_steering"]
