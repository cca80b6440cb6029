FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir .
EXPOSE 8683
CMD ["akosha-sync", "serve", "--transport", "http", "--host", "0.0.0.0"]
