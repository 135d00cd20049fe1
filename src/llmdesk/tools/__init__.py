"""Tools for models: Python functions as tools (schemas from type hints and docstrings) and the
agent loop that runs the calls a model makes."""
