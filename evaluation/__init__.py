"""Evaluation of generated crystals: validity, relaxation, stability, uniqueness, novelty (SUN),
property adherence and the CDVAE benchmark metrics.

    from xtalgen.evaluation import evaluate_structures
    rows, summary = evaluate_structures(structures, reference=training_structures, relax=False)

Never imports models or training (import-linter contract): it judges structures, whoever made them.
"""

from xtalgen.evaluation.pipeline import evaluate_inputs, evaluate_structures

__all__ = ["evaluate_inputs", "evaluate_structures"]
