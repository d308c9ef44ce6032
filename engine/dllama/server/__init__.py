"""The pieces of `dllama-api`, one concern per module:

    main.py       the command: flags, loading (with dllama.launch), uvicorn
    host.py       the engine behind a holder: up/down state, worker loss, the reconnect loop
    scheduler.py  the bounded queue in front of the one engine thread
    batch.py      the running requests, one per sequence slot (each with its prefix cache), one step
    jobs.py       a request as the engine thread sees it, the events it sends back
    text.py       tokens -> text deltas: stop strings, <think> reasoning split
    schemas.py    request validation (OpenAI's fields, OpenAI-shaped errors)
    errors.py     ApiError: an HTTP status plus OpenAI's error body
    metrics.py    the Prometheus registry
    history.py    the last minutes' rates per time bucket (the /cluster page's plots)
    nodes.py      every node's figures (the workers' over STATS), and telling the host of a dead worker
    pages.py      the chat and boards pages from static/, with their Content-Security-Policy
    app.py        the starlette routes, SSE streaming, auth, body limits
    connections.py  uvicorn's h11 protocol with read deadlines, a connection cap, JSON errors
    logs.py       warnings a client can cause, rate-limited

Only app.py and pages.py import starlette; host.py imports nothing beyond the standard library, so the
engine may raise `WorkerLost` without pulling in the web stack.
"""
