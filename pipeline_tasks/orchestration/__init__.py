"""How the system is run: a local Airflow (services, REST client) and the library side of the
DAGs' tasks (parameter checks, shard batches for mapping, the Spark connection, the final
report). DAG files call into here; nothing here is imported by the stages.
"""
