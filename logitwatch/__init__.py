"""logitwatch: a training-stability monitor for large-language-model pre-training.

The shared core (this package) holds the wire protocol and the metric catalogue. The
training side is ``logitwatch.agent`` (needs torch); the server is ``logitwatch.service``.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
