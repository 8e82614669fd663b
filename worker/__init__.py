"""sitegen-worker: arq jobs in, finished static websites out, with live progress in PostgreSQL."""
