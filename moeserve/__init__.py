"""moeserve: Mixture-of-Experts LLM inference from GGUF files, weights kept packed."""

from moeserve.engine.llm import LLM
from moeserve.engine.outputs import CompletionOutput, RequestOutput
from moeserve.engine.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
