"""A local GauGAN-style painting app for any trained or converted clade_jax model.

    python -m clade_jax.paint --workdir=DIR [--port=8000] [--host=127.0.0.1]

Paint a label map in the browser, see the synthesized photo beside it. `server.py` holds the HTTP
API and the model wrapper; `static/` the page (plain HTML/JS/CSS, no build step, works offline).
"""

from clade_jax.paint.server import PaintModel, create_app, serve, serve_in_thread

__all__ = ["PaintModel", "create_app", "serve", "serve_in_thread"]
