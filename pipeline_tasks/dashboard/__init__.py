"""The shard-progress dashboard: a live page, JSON endpoints and Prometheus metrics.

It reads what the stages leave behind (markers, ``metrics.jsonl``, the results store), so it
shows runs started from Airflow and from the CLI alike. Served on its own by
``mofi dashboard`` (:func:`app.serve`) or inside Airflow's API server by the plugin in
:mod:`.airflow_plugin` (behind Airflow's authentication).
"""
