#!/bin/sh
# Runs once, when the postgres service initialises its volume: the MOFI results store
# (`mofi eval --results`, `mofi results`; MOFI_RESULTS_URL in docker/compose.yaml) gets its
# own database next to Airflow's metadata DB.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "CREATE DATABASE \"${MOFI_RESULTS_DB}\" OWNER \"${POSTGRES_USER}\""
