"""Tools for models: prompt templates and MCP servers' tools. Python functions as tools and the
agent loop that runs the calls a model makes live in the conversation layer (runtime/functions.py,
runtime/agent.py), under `model.chat(messages, tools=[...])`."""
