"""cam-vllm: KV-cache eviction with CaM cache merging, for vLLM and as a pure-PyTorch reference.

Importing the package is cheap and never imports vLLM: the math lives in :mod:`cam_vllm.core`,
the policies in :mod:`cam_vllm.policies`, the transformers reference engine in
:mod:`cam_vllm.reference`.
"""

__version__ = "0.1.0"
