"""Speed measurement: `llmdesk bench` (core.py: pp/tg/TTFT through the Engine, roofline), plots,
random-weight models of real shapes (make_model.py), and the server load generator (load.py)."""
