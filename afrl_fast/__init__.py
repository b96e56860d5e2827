"""afrl-fast: Answer-First, Reason-Later relevance judges."""
__version__ = "0.1.0"
