"""The knowledge base: ``KB/entities.parquet`` from packaged sources or a user's table.

* ``names``: how entity names are compared and shortened (used by every later stage);
* ``sources``: the builtin sources and the reader of a user's table;
* ``stage``: the KB contract, its cleaning rules, ``mofi kb`` and :func:`load_kb`.
"""
