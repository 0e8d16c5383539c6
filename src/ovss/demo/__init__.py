"""``ovss demo``: a local web page to compare methods on your own photo (optional extra ``ovss[demo]``).

``session.py`` holds the work (segmenters, per-image feature cache, predictions) and needs no Gradio;
``render.py`` draws what the page shows (window grid, colour legend, timings); ``app.py`` is the Gradio page,
a thin layer over the session. Nothing here is imported by ``ovss`` itself.
"""
