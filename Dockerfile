# syntax=docker/dockerfile:1
# lazyfs in a container: the entrypoint is `lazyfs mount`, which runs in the
# foreground and unmounts cleanly on `docker stop` (SIGTERM).
#   docker build --target runtime -t lazyfs .
#   docker run --rm --device /dev/fuse --cap-add SYS_ADMIN \
#     -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_REGION \
#     -v "$PWD/model.json:/app/model.json:ro" lazyfs --config /app/model.json
# Only /dev/fuse and CAP_SYS_ADMIN are needed (no --privileged); it also runs
# with --security-opt no-new-privileges and --read-only when the store is a
# volume.  podman takes the same commands.  scripts/container-test builds both
# targets and runs them.  See README.md ("Running in a container") for sharing
# the mount with the model server's container, and the Kubernetes pod spec.

FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config patch \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# pyfuse3 with FUSE passthrough, libfuse 3.17 inside its wheel (see the script).
COPY scripts/native ./scripts/native
RUN scripts/native/build-pyfuse3 /wheels \
 && echo "pyfuse3==3.5.0+passthrough" > /constraints.txt
COPY pyproject.toml README.md ./
COPY lazyfs ./lazyfs
# Build every wheel here, install them below.
RUN pip wheel --no-cache-dir --wheel-dir /wheels --find-links /wheels --constraint /constraints.txt . \
 && cd /wheels && sha256sum *.whl > /wheels.sha256

FROM python:3.11-slim-bookworm AS runtime
# user_allow_other: the commands below pass --allow-other (a model server in
# another container, or under another uid, reads the mount), which a lazyfs
# run with --user needs this for; as root it needs nothing.
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 libfuse3-3 attr \
 && rm -rf /var/lib/apt/lists/* \
 && echo user_allow_other >> /etc/fuse.conf
# The wheels are bind-mounted from the build stage, not copied: no layer keeps
# them.  Their checksums are copied first (and kept, a record of what was
# installed): buildah's cache does not look into a bind mount, so without this
# a rebuild after a change to lazyfs would reuse the old install.
COPY --from=build /wheels.sha256 /usr/share/lazyfs/wheels.sha256
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir /wheels/*.whl \
 && mkdir -p /var/practicus/cache /opt/lazyfs/store
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["lazyfs", "mount"]
CMD ["--config", "/app/model.json", "--allow-other"]

# Production: the same image with the model's files baked into the store
# folder /opt/lazyfs/store, pinned by a lock file (see README, "Pinned
# deployments"): the bake fetches exactly the versions the lock names (by
# version id, checked against the lock), and the mount serves exactly them,
# with no request at start, so a pod starts, scales up and recovers without
# downloading, and an overwrite in the bucket changes nothing it serves.
# Make the lock once the version is approved:
#   lazyfs lock --config model.json -o model.lock.json
# Credentials come in as a build secret (BuildKit, or podman): they are never
# written to a layer.  MODEL_JSON and MODEL_LOCK are paths inside the build
# context; AWS_ENDPOINT_URL points the bake at a store other than AWS.  The
# bake prints a progress line every 5 s.
#   docker build --target production \
#     --secret id=aws,src=$HOME/.aws/credentials \
#     --build-arg MODEL_JSON=model.json --build-arg MODEL_LOCK=model.lock.json \
#     --build-arg AWS_REGION=eu-west-1 -t my-model:prod .
FROM runtime AS production
ARG MODEL_JSON=model.json
ARG MODEL_LOCK=model.lock.json
ARG AWS_REGION=
ARG AWS_ENDPOINT_URL=
COPY ${MODEL_JSON} /app/model.json
COPY ${MODEL_LOCK} /app/model.lock.json
# (empty build args are unset, so the AWS chain's own defaults apply)
RUN --mount=type=secret,id=aws,target=/root/.aws/credentials,required=true \
    [ -n "$AWS_REGION" ] || unset AWS_REGION; \
    [ -n "$AWS_ENDPOINT_URL" ] || unset AWS_ENDPOINT_URL; \
    lazyfs bake --lock /app/model.lock.json --to /opt/lazyfs/store
CMD ["--lock", "/app/model.lock.json", "--store", "/opt/lazyfs/store", "--allow-other"]
