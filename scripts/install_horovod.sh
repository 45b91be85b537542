#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (Gloo, PyTorch; no MPI, TensorFlow or MXNet) against the
# torch already installed. Idempotent: does nothing when `import horovod.torch` works.
#
# Why a script: 0.28.1, the latest release on PyPI, pins C++14 in its CMake files, and torch
# 2.1 and newer need C++17 (horovod issues #3941 and #3996; the fix, PR #3998, was merged
# but never released). A small cmake wrapper switches the standard to 17 in the unpacked
# source tree before cmake configures it.
#
# Cost: about 5 minutes of compiling on 2 cores, once. The wheel is kept under
# ~/.cache/sparse-comm/wheels, keyed by the torch version, so later runs on the same machine
# install it in seconds.
set -euo pipefail

PY=${PYTHON:-python}
if "$PY" -c "import horovod.torch" 2>/dev/null; then
    echo "install_horovod: horovod.torch already importable"
    exit 0
fi

TORCH=$("$PY" -c "import torch; print(torch.__version__)")
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/sparse-comm/wheels/horovod-0.28.1-torch-${TORCH}"
mkdir -p "$CACHE"

if ! ls "$CACHE"/horovod-0.28.1-*.whl >/dev/null 2>&1; then
    command -v cmake >/dev/null || "$PY" -m pip install -q cmake
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    # The wrapper runs where cmake configures: the source tree is the argument that holds
    # a CMakeLists.txt (setup.py passes it as the first path).
    REAL_CMAKE=$(command -v cmake)
    cat > "$WORK/cmake" <<EOF
#!/usr/bin/env bash
for arg in "\$@"; do
    if [ -f "\$arg/CMakeLists.txt" ]; then
        grep -rl --include=CMakeLists.txt 'CMAKE_CXX_STANDARD 14' "\$arg" \
            | xargs -r sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/'
    fi
done
exec "$REAL_CMAKE" "\$@"
EOF
    chmod +x "$WORK/cmake"
    echo "install_horovod: building horovod 0.28.1 against torch $TORCH (about 5 minutes)"
    HOROVOD_CMAKE="$WORK/cmake" HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 \
        HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
        MAKEFLAGS="-j$(nproc)" \
        "$PY" -m pip wheel --no-build-isolation --no-deps -w "$CACHE" horovod==0.28.1
fi
"$PY" -m pip install -q --no-deps "$CACHE"/horovod-0.28.1-*.whl
# Horovod's own run-time dependencies (horovodrun needs them).
"$PY" -m pip install -q cloudpickle psutil pyyaml packaging
"$PY" -c "import horovod.torch" && echo "install_horovod: ok"
