"""``meswitch serve STORE --ray``: start (or join) a Ray cluster and run the application on it."""

from __future__ import annotations

import time
from typing import Any

from meswitch.ray_app.app import application
from meswitch.ray_app.config import RayAppConfig

APP_NAME = "meswitch"


def deploy(config: RayAppConfig, host: str = "127.0.0.1", port: int = 8000, router: Any = "auto") -> str:
    """Start Serve's HTTP proxy on ``host:port`` (in the Ray cluster already initialised) and deploy.

    Returns the base URL once every replica is up.
    """
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(application(config, router), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def run(config: RayAppConfig, host: str = "127.0.0.1", port: int = 8000, address: str | None = None) -> None:
    """Connect to the Ray cluster at ``address`` (None: start a local one), deploy, serve until Ctrl-C."""
    import ray
    from ray import serve

    ray.init(address=address)
    try:
        url = deploy(config, host, port)
        print(f"meswitch: Ray Serve on {url}/v1 over {config.replicas} engine replica(s) "
              f"({config.experts_per_replica or 'all'} experts per replica); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
