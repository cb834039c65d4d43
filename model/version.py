"""The project's version, kept here and nowhere else.

pyproject.toml, the API (`/version`, `/healthz`, `/models`, the OpenAPI document), the page footer, the
training record of every bundle and the container image's labels (`make image`) all read it from here,
so a release changes this one line. A plain module rather than installed-package metadata, because the
service runs from a source tree and a container that never `pip install` the project itself.
"""

__version__ = "0.1.0"
