# GPU image: NGC PyTorch 25.12 ships CUDA, NCCL, cuDNN, Transformer Engine, apex and flash-attn;
# only this package and its pure-Python dependencies are installed on top.
#
# nvcr.io/nvidia/pytorch:25.12-py3, as NVIDIA's release notes for 25.12 give it: CUDA 13.1.0,
# Python 3.12, torch 2.10.0a0+b4e4ee81d3. That torch is a pre-release build of 2.10: it satisfies
# pyproject's `torch>=2.9` (a floor of 2.10 would not be met by 2.10.0a0, and pip would try to
# replace it). Transformer Engine and flash-attn versions are not in the notes we could read
# (expected: Transformer Engine 2.10, flash-attn 2.7.x or 2.8.x): the build checks both against
# the ranges of the `gpu` extra (longvila_mcore/runtime/device.py) and stops naming the version
# if one is outside. tests/test_gpu_image.py keeps this file, pyproject.toml and README agreeing.
#
# pip runs under the image's own constraints (/etc/pip/constraint.txt pins every package the
# image was built with), so it can never replace the image's torch, Transformer Engine,
# flash-attn or apex: a requirement they would break fails the build instead.
FROM nvcr.io/nvidia/pytorch:25.12-py3

WORKDIR /workspace/longvila-mcore
COPY pyproject.toml README.md ./
COPY longvila_mcore ./longvila_mcore
RUN pip install --no-cache-dir --constraint /etc/pip/constraint.txt -e . \
    && python -c "from longvila_mcore.runtime.device import check_gpu_stack; print(check_gpu_stack())" \
    && python -c "import longvila_mcore, megatron.core, transformer_engine, flash_attn"
COPY configs ./configs
COPY tools ./tools
COPY launch ./launch

ENV PYTHONUNBUFFERED=1
CMD ["bash"]
