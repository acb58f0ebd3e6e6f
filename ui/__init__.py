"""`klong ui`: a read-only web viewer of the archive (FastAPI + Jinja2 templates + one static JS/CSS file,
no build step, nothing loaded from the internet). The app is in ui.app; the queries it runs are in
ui.viewer, ui.overlay and ui.report."""
