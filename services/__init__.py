"""Services: the long-running processes the library starts and talks to.

    broker.py        the embedded Kafka-protocol broker (start/stop/status, topics)
    serve.py         the policy server: vLLM's OpenAI API with weight reloads in place
    serve_worker.py  the vLLM worker extension serve.py loads into vLLM's workers
"""
