FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir .
COPY docker/entrypoint.sh /usr/local/bin/akosha-sync-entrypoint
ENV AKOSHA_SYNC_STATE_DIR=/state
VOLUME /state
EXPOSE 8683
# A non-loopback bind needs a token: pass AKOSHA_SYNC_DAEMON_TOKEN, or the entrypoint
# generates one into /state/daemon-token.
ENTRYPOINT ["akosha-sync-entrypoint"]
CMD ["akosha-sync", "serve", "--transport", "http", "--host", "0.0.0.0"]
