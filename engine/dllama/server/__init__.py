"""The pieces of `dllama-api`, one concern per module:

    main.py       the command: flags, loading (with dllama.launch), uvicorn
    host.py       the engine behind a holder: up/down state, worker loss, the reconnect loop
    scheduler.py  the bounded queue, the one engine thread, the prefix cache
    text.py       tokens -> text deltas: stop strings, <think> reasoning split
    schemas.py    request validation (OpenAI's fields, OpenAI-shaped errors)
    errors.py     ApiError: an HTTP status plus OpenAI's error body
    metrics.py    the Prometheus registry
    app.py        the starlette routes, SSE streaming, auth, body limits
    connections.py  uvicorn's h11 protocol with read deadlines, a connection cap, JSON errors
    logs.py       warnings a client can cause, rate-limited

Only app.py imports starlette; host.py imports nothing beyond the standard library, so the
engine may raise `WorkerLost` without pulling in the web stack.
"""
