# mixmap as a BIDS App:
#   docker build -t mixmap .
#   docker run --rm -v /data/ds:/bids:ro -v /data/out:/out mixmap /bids /out participant \
#       --participant-label 01 02 --method vae-gmm
# CPU build (torch's CPU wheel); for a GPU, start from an image with CUDA and install the
# matching torch wheel instead, then pass --device cuda.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/mixmap
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
    && pip install . \
    && useradd --create-home mixmap
USER mixmap
ENTRYPOINT ["mixmap-bids"]
