"""Grammar-constrained decoding (structured output): a request's StructuredOutput compiled with llguidance
(`compiler.py`, cached per spec) into a per-request `GrammarState` (`state.py`) that masks every row of a
pass, prunes draft trees, follows the verified tokens and forces the tokens the grammar leaves no choice in.
"""

from specdesk.engine.grammar.compiler import GrammarCompiler
from specdesk.engine.grammar.state import GrammarState, GrammarStats

__all__ = ["GrammarCompiler", "GrammarState", "GrammarStats"]
