FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY handlers ./handlers
COPY bench ./bench
COPY config ./config
RUN pip install --no-cache-dir .
EXPOSE 8080
CMD ["baton", "serve"]
