# pipeline-balancer: the balancer (default command) and the simulated worker
# (`pipeline-balancer worker ...`) in one small image.
#
#   docker build -t localhost:32000/pipeline-balancer:dev .
#
# Two stages: `builder` turns the project and every dependency into wheels; the
# final stage installs only those wheels (no index, no compiler, no pip cache,
# no wheel files left behind: they come in through a bind mount).
# tests/test_deploy.py replays the pip steps below in a fresh venv and starts the
# default command from it: keep each pip step a plain `python -m pip ...` command.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY balancer ./balancer
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="pipeline-balancer" \
      org.opencontainers.image.description="Load balancer for Intel DL Streamer Pipeline Server workers on Kubernetes" \
      org.opencontainers.image.licenses="BSD-3-Clause"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# pip, setuptools and wheel go too: nothing installs anything at run time.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links /wheels /wheels/pipeline_balancer-*.whl \
    && python -m pip uninstall --yes pip setuptools wheel
RUN groupadd --system --gid 10001 balancer \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
       --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin balancer
# Numeric, so that Kubernetes can check runAsNonRoot.
USER 10001:10001
EXPOSE 31000
ENTRYPOINT ["pipeline-balancer"]
CMD ["serve", "--kubernetes"]
