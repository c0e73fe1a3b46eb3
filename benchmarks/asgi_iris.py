"""The iris app as an importable ASGI object, for running it under other ASGI servers."""

from infercore.config.compose import compose
from infercore.runtime import Runtime
from infercore.server import create_app

app = create_app(Runtime(compose(["+recipe=iris"])))
