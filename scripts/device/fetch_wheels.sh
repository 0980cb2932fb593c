#!/usr/bin/env bash
# Wheels for the lent GPU machine, fetched here (it reaches no package index): the runtime packages
# of ours that its image lacks. Its image has Python 3.12 on x86-64 with torch 2.11, torchvision,
# numpy, scipy, PyYAML, cloudpickle, safetensors, tqdm, pytest, pytest-xdist and scikit-learn.
# They land in .whl/ (ignored by git, about 23 MB); scripts/device/gpu_checks.py installs them
# there into a private folder on PYTHONPATH, and the device call carries ".whl".
#
#   scripts/device/fetch_wheels.sh
#   run(carry=[".whl"], command="python3 scripts/device/gpu_checks.py --plan core --budget 330")
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.whl
mkdir -p "$dest"
# xformers 0.0.35 (the newest on PyPI) needs torch >= 2.10. PyPI has one build of it, made with torch
# 2.10 and CUDA 12.8 (cpp_lib.json; kernels for sm 7.5, 8.0 and 9.0a). It need not match torch 2.11
# exactly: its _C.so is built on torch's stable ABI and imports only C shims (aoti_torch_*, torch_*)
# and no libtorch C++ symbol (nm -D --undefined-only), so one build serves torch 2.10 and later. It
# does need libcudart.so.12, which a CUDA 13 image lacks, so the CUDA 12.8 runtime comes too
# (gpu_checks.py puts its lib folder on LD_LIBRARY_PATH). With it, the extension loads under torch
# 2.11+cu130 (checked here on CPU, 2026-12-01); whether its kernels run there is what the GPU tests check.
# If _C.so does not load, `import xformers.ops` still succeeds (xFormers only warns), so env_check.py's
# probe, which runs its attention kernel, is what tells.
# omegaconf 2.4 needs only PyYAML; submitit is for the launcher tests; faiss-cpu for the k-NN and
# curation tests of the whole suite (a faiss GPU build is hundreds of MB, over the 64 MiB a call carries).
# fvcore and iopath are dependencies of ours and of the original's code, published as sources only
# (pure Python): built into wheels here, with the small packages they import.
packages=("xformers==0.0.35" "nvidia-cuda-runtime-cu12==12.8.90" "omegaconf==2.4.0" "submitit==1.5.4"
  "faiss-cpu==1.15.1" "yacs==0.1.8" "termcolor==3.3.0" "tabulate==0.10.0" "portalocker==4.4.2")
download() {
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
download -d "$dest" "${packages[@]}"
python3 -m pip wheel --quiet --no-deps -w "$dest" "fvcore==0.1.5.post20221221" "iopath==0.1.10" \
  2> >(grep -v "^WARNING: Location" >&2)
# The original implementation, for scripts/device/benchmark_original.py: PyPI's dinov2 0.0.1.dev2, a
# third party's upload of Meta's training code (CC-BY-NC). It sits in a folder of its own, so that
# gpu_checks.py does not install it: it is a package named dinov2 too. It is never committed.
download -d "$dest/original" "dinov2==0.0.1.dev2"
ls -l "$dest" "$dest/original"
du -sh "$dest"
