"""vLLM general-plugin entry point (``vllm.general_plugins`` -> ``cam_vllm.plugin:register``).

vLLM calls :func:`register` in every process it starts (API server or the user's process, the
engine core, each worker). The work is done by :func:`cam_vllm.vllm_plugin.register`, imported
here lazily: this module stays cheap to import and does not import vLLM at import time.
"""


def register() -> None:
    """Register cam-vllm with vLLM; idempotent, safe to call any number of times."""
    from cam_vllm.vllm_plugin import register as _register

    _register()
