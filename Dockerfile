# Shoebox Discord bot, CPU only.
#
#   docker build -t shoebox .
#   docker run -d --name shoebox --restart unless-stopped --env-file .env -v shoebox-data:/data shoebox
#
# Everything Shoebox keeps (catalog, vector index, stored copies, the bot's job queue, downloaded
# CLIP weights) lives in /data, so the container can be replaced without losing anything. Other
# sub-commands run the same way, e.g. `docker run --rm --env-file .env -v shoebox-data:/data shoebox stats`.

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SHOEBOX_DATA=/data \
    HF_HOME=/data/model-cache

WORKDIR /app

# torch from PyTorch's CPU-only index first: the default wheels bundle CUDA libraries (gigabytes).
# The versions match pyproject.toml, so installing the project below keeps these builds.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md ./
COPY bot ./bot
COPY store ./store
COPY tools ./tools
RUN pip install . && rm -rf /app/build

RUN useradd --create-home --uid 10001 shoebox \
    && mkdir -p /data \
    && chown shoebox:shoebox /data
USER shoebox
VOLUME ["/data"]

# The bot stops cleanly on SIGTERM (docker stop); queued photos are kept in /data for the next start.
STOPSIGNAL SIGTERM
ENTRYPOINT ["shoebox"]
CMD ["bot"]
