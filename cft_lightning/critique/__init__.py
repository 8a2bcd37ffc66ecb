"""LVLM-VA's critique stage (`cft critique`): low-entropy sampling, attributions, PPEPS-WGM segments, critic and
judge, corrective masks (mask kind `critic`) for the `LVLMCritic` regularizer."""

from cft_lightning.critique.critic import CriticAndJudge, OracleCritic, parse_verdicts
from cft_lightning.critique.ppeps import effect_mass, fit_weighted_gmm, ppeps_segments
from cft_lightning.critique.run import CritiqueSettings, run_critique
from cft_lightning.critique.sampling import lowest_entropy, predictive_entropy

__all__ = [
    "CritiqueSettings",
    "CriticAndJudge",
    "OracleCritic",
    "effect_mass",
    "fit_weighted_gmm",
    "lowest_entropy",
    "parse_verdicts",
    "ppeps_segments",
    "predictive_entropy",
    "run_critique",
]
