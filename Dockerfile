# diffgentor on an official PyTorch CUDA image (its CUDA torch is kept). The install step is the README's GPU install,
# scripts/install_gpu.sh. Build and run (the model comes from the Hugging Face cache mounted at /root/.cache):
#   docker build -t diffgentor .
#   docker run --gpus all -p 8000:8000 -v ~/.cache/huggingface:/root/.cache/huggingface diffgentor \
#       serve tencent/HunyuanImage-3.0-Instruct-Distil --host 0.0.0.0 --tensor-parallel-size 8
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}
WORKDIR /opt/diffgentor
COPY . /opt/diffgentor
RUN bash scripts/install_gpu.sh
EXPOSE 8000
ENTRYPOINT ["diffgentor"]
CMD ["--help"]
