"""Prefect flows: the catalog flow (catalog.py), its schedule (schedule.py) and the servers
for server mode (server.py).

Importing this package changes nothing in the environment. Prefect reads its settings when it
is imported, so an entry point calls ``conceptflow.tool_env.use_tool_defaults()`` before
importing a flow (the CLI does for every command): ephemeral mode with its state under
./.prefect unless PREFECT_HOME or PREFECT_API_URL say otherwise, analytics off.
"""
