# lazyfs in a container: the entrypoint is `lazyfs mount`, which runs in the
# foreground and unmounts cleanly on `docker stop` (SIGTERM).
#   docker build -t lazyfs .
#   docker run --rm --device /dev/fuse --cap-add SYS_ADMIN \
#     -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_REGION \
#     -v "$PWD/model.json:/app/model.json:ro" lazyfs --config /app/model.json
# See README.md ("Running in a container") for the flags and for sharing the
# mount with the model server's container.

FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libfuse3-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lazyfs ./lazyfs
# pyfuse3 compiles against libfuse3: build every wheel here, install them below.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 libfuse3-3 attr \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && mkdir -p /var/practicus/cache
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["lazyfs", "mount"]
CMD ["--config", "/app/model.json"]
