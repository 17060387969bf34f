"""The robot agent: the Django-free edge process that runs one robot (``python -m robots.agent``; docs/agent.md)."""
