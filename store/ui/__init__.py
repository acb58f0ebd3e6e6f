"""`klong ui`: a read-only web viewer of the archive (FastAPI + Jinja2 templates + one static JS/CSS file,
no build step, nothing loaded from the internet). The app is in store.ui.app; the queries it runs are in
store.viewer, store.overlay and store.report."""
