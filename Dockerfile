# GPU image: NGC PyTorch ships CUDA, NCCL, Transformer Engine, apex and flash-attn, so only this
# package and its pure-Python dependencies are installed on top. The image's own torch is kept
# (NGC pins it through PIP_CONSTRAINT).
FROM nvcr.io/nvidia/pytorch:25.01-py3

WORKDIR /workspace/longvila-mcore
COPY pyproject.toml README.md ./
COPY longvila_mcore ./longvila_mcore
RUN pip install --no-cache-dir -e . && python -c "import longvila_mcore, megatron.core"
COPY configs ./configs
COPY tools ./tools
COPY launch ./launch

ENV PYTHONUNBUFFERED=1
CMD ["bash"]
