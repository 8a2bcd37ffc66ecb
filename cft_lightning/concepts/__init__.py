"""Concept discovery (`cft concepts`): an LLM proposes concepts per class, LF-CBM filters clean them."""

from cft_lightning.concepts.bank import load_concept_bank
from cft_lightning.concepts.discovery import PROMPTS, discover, load_classes, parse_list
from cft_lightning.concepts.filters import filter_concepts
from cft_lightning.concepts.llm import CachedChat
from cft_lightning.errors import ChatError

__all__ = [
    "PROMPTS",
    "CachedChat",
    "ChatError",
    "discover",
    "filter_concepts",
    "load_classes",
    "load_concept_bank",
    "parse_list",
]
